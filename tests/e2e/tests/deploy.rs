//! What SREs get in `deploy/`, checked against the metric catalogue of `docs/observability.md` and against
//! the real binary: the alert rules load and pass their unit tests, every alert has a runbook and tests that
//! fire it and that must not fire it, every dashboard query is valid PromQL on the `datasource` variable, the
//! dashboards and alerts name only catalogued metrics, and `/metrics` of a real `serve` lints clean,
//! exposes every catalogued metric with its documented type and labels, and its figures (license, queues,
//! offer and message latencies, connections, refusals, actors, shards, store) say what its traffic did.
//!
//! The checks run `promtool` (Debian's `prometheus` package, which `./scripts/test` installs).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use switchboard_e2e::exposition::Exposition;
use switchboard_e2e::{Client, Server};
use switchboard_proto::public::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DASHBOARDS: [&str; 4] = ["cluster-overview.json", "queues-routing.json", "gateway.json", "store.json"];
/// The catalogue sections whose metrics `serve` (every role in one process) must expose.
const SERVED_SECTIONS: [&str; 4] = ["Every role", "Gateway", "Router", "Store"];
/// Grafana's interval variables, replaced by a fixed range for promtool.
const GRAFANA_INTERVALS: [&str; 3] = ["__rate_interval", "__interval", "__range"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(repo_root().join(relative)).with_context(|| format!("reading {relative}"))
}

/// Runs `promtool` with these arguments (and this standard input), from the repository root.
fn promtool(args: &[&str], stdin: Option<&str>) -> anyhow::Result<Output> {
    let mut child = match Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "promtool is not on PATH: run ./scripts/test, which installs it (Debian's `prometheus` package), \
             or `apt-get install prometheus`"
        ),
        Err(error) => return Err(error).context("starting promtool"),
    };
    let mut input = child.stdin.take().context("promtool stdin")?;
    input.write_all(stdin.unwrap_or_default().as_bytes())?;
    drop(input);
    Ok(child.wait_with_output()?)
}

fn promtool_ok(args: &[&str]) -> anyhow::Result<()> {
    let output = promtool(args, None)?;
    ensure!(output.status.success(), "promtool {} failed:\n{}", args.join(" "), output_text(&output));
    Ok(())
}

fn output_text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

// ---------------------------------------------------------------------------------------------------------
// The catalogue
// ---------------------------------------------------------------------------------------------------------

struct Catalogued {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
    section: String,
}

/// The metrics tables of docs/observability.md: `| \`name\` | type | labels | meaning |`, by `###` section.
fn catalogue() -> anyhow::Result<Vec<Catalogued>> {
    let mut section = String::new();
    let mut metrics = Vec::new();
    let text = read("docs/observability.md")?;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix('#') {
            section = heading.trim_start_matches('#').trim().to_owned();
            continue;
        }
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let (Some(name), Some(&kind), Some(&labels)) =
            (backticked(cells[0]).into_iter().next(), cells.get(1), cells.get(2))
        else {
            continue;
        };
        if ["counter", "gauge", "histogram"].contains(&kind) {
            let labels = backticked(&without_parentheses(labels)).into_iter().collect();
            metrics.push(Catalogued { name, kind: kind.to_owned(), labels, section: section.clone() });
        }
    }
    ensure!(metrics.len() > 20, "docs/observability.md lists only {} metrics: did its tables change?", metrics.len());
    Ok(metrics)
}

fn backticked(text: &str) -> Vec<String> {
    text.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

/// `\`reason\` (a code: \`a\`, \`b\`)` → `\`reason\``: the values listed after a label are not labels.
fn without_parentheses(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|&c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

/// The names a query may use: the catalogue's, a histogram's series, and the scrape's `up`.
fn allowed_names(catalogue: &[Catalogued]) -> BTreeSet<String> {
    let mut names = BTreeSet::from(["up".to_owned()]);
    for metric in catalogue {
        names.insert(metric.name.clone());
        if metric.kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{}{suffix}", metric.name));
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------------------
// PromQL: metric names and Grafana variables
// ---------------------------------------------------------------------------------------------------------

/// Aggregations, set operators and modifiers: words of PromQL that are not metric names.
const PROMQL_WORDS: [&str; 26] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "atan2",
];
/// Words followed by a list of label names in parentheses.
const LABEL_LIST_WORDS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names of a PromQL expression: identifiers outside strings, label matchers and ranges that
/// are neither functions (followed by `(`), PromQL words, nor label lists (`by (...)`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            i = after_string(&chars, i);
        } else if c == '{' || c == '[' {
            i = after_closing(&chars, i, if c == '{' { '}' } else { ']' });
        } else if c == '#' {
            i = chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |n| i + n);
        } else if c.is_ascii_digit() || c == '.' {
            i += chars[i..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '.').count();
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let length =
                chars[i..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '_' || **c == ':').count();
            let word: String = chars[i..i + length].iter().collect();
            i += length;
            let next = chars[i..].iter().position(|c| !c.is_whitespace()).map(|n| i + n);
            let opens = next.is_some_and(|n| chars[n] == '(');
            if opens && LABEL_LIST_WORDS.contains(&word.as_str()) {
                i = after_closing(&chars, next.unwrap_or(i), ')');
            } else if !opens && !PROMQL_WORDS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn after_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' && quote != '`' { 2 } else { 1 };
    }
    (i + 1).min(chars.len())
}

fn after_closing(chars: &[char], start: usize, closing: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != closing {
        i = if matches!(chars[i], '"' | '\'' | '`') { after_string(chars, i) } else { i + 1 };
    }
    (i + 1).min(chars.len())
}

/// Replaces Grafana variables (`$name`, `${name}`, `${name:format}`) by a value promtool can parse: `5m`
/// for the interval variables, the variable's name for the dashboard's own. Unknown variables are an error.
fn substitute_variables(expr: &str, defined: &BTreeSet<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        let (name, consumed) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').ok_or_else(|| format!("unclosed ${{ in {expr}"))?;
                (braced[..end].split(':').next().unwrap_or_default(), end + 2)
            }
            None => {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        if GRAFANA_INTERVALS.contains(&name) {
            out.push_str("5m");
        } else if defined.contains(name) {
            out.push_str(name);
        } else {
            return Err(format!("unknown variable ${name}"));
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

#[test]
fn metric_names_are_told_apart_from_functions_labels_and_variables() {
    let expr = r#"histogram_quantile(0.99, sum by (le, group) (rate(a_seconds_bucket{job=~"$job", x="b{c}"}[$__rate_interval])))
        / on (tenant) group_left () max without (instance) (b_total offset 5m) > bool 0.5 and c:d or vector(1)"#;
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["a_seconds_bucket", "b_total", "c:d"]);
    let defined = BTreeSet::from(["job".to_owned(), "group".to_owned()]);
    assert_eq!(
        substitute_variables(r#"rate(x{job=~"$job", group=~"${group:regex}"}[$__rate_interval])"#, &defined),
        Ok(r#"rate(x{job=~"job", group=~"group"}[5m])"#.to_owned())
    );
    assert_eq!(substitute_variables("x{a=\"$tenat\"}", &defined), Err("unknown variable $tenat".to_owned()));
}

// ---------------------------------------------------------------------------------------------------------
// Alert rules
// ---------------------------------------------------------------------------------------------------------

fn yaml(relative: &str) -> anyhow::Result<Value> {
    serde_yaml_ng::from_str(&read(relative)?).with_context(|| format!("parsing {relative}"))
}

/// Every rule of alerts.yml.
fn alert_rules() -> anyhow::Result<Vec<Value>> {
    let rules = yaml("deploy/prometheus/alerts.yml")?;
    let groups = rules["groups"].as_array().context("alerts.yml: no groups")?;
    Ok(groups.iter().flat_map(|group| group["rules"].as_array().cloned().unwrap_or_default()).collect())
}

#[test]
fn alert_rules_load_and_pass_their_unit_tests() -> anyhow::Result<()> {
    promtool_ok(&["check", "rules", "deploy/prometheus/alerts.yml"])?;
    promtool_ok(&["test", "rules", "deploy/prometheus/alerts_test.yml"])
}

/// `check config` also loads the rule files it names (alerts.yml, relative to prometheus.yml); it needs no
/// running target.
#[test]
fn the_example_prometheus_config_is_valid() -> anyhow::Result<()> {
    promtool_ok(&["check", "config", "deploy/prometheus/prometheus.yml"])
}

#[test]
fn every_alert_has_a_runbook_and_tests_that_fire_it_and_that_must_not() -> anyhow::Result<()> {
    let readme = read("deploy/README.md")?;
    let anchors: BTreeSet<String> = readme.lines().filter_map(|line| line.strip_prefix('#')).map(anchor).collect();
    let tests = yaml("deploy/prometheus/alerts_test.yml")?;
    let (mut fired, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for case in tests["tests"].as_array().context("alerts_test.yml: no tests")? {
        for check in case["alert_rule_test"].as_array().into_iter().flatten() {
            let alert = check["alertname"].as_str().unwrap_or_default().to_owned();
            if check["exp_alerts"].as_array().is_some_and(|alerts| !alerts.is_empty()) {
                fired.insert(alert);
            } else {
                quiet.insert(alert);
            }
        }
    }
    let mut problems = Vec::new();
    for rule in alert_rules()? {
        let Some(alert) = rule["alert"].as_str() else { continue };
        let annotations = &rule["annotations"];
        for (what, present) in [
            ("a `for`", rule["for"].is_string()),
            (
                "labels.severity warning or critical",
                matches!(rule["labels"]["severity"].as_str(), Some("warning" | "critical")),
            ),
            ("annotations.summary", annotations["summary"].is_string()),
            ("annotations.description", annotations["description"].is_string()),
            ("a test that fires it", fired.contains(alert)),
            ("a test where it must not fire", quiet.contains(alert)),
        ] {
            if !present {
                problems.push(format!("{alert}: no {what}"));
            }
        }
        match annotations["runbook"].as_str().and_then(|runbook| runbook.strip_prefix("deploy/README.md#")) {
            Some(target) if anchors.contains(target) => {}
            _ => problems.push(format!("{alert}: annotations.runbook is not deploy/README.md#<a heading there>")),
        }
    }
    ensure!(problems.is_empty(), "alerts.yml:\n  {}", problems.join("\n  "));
    Ok(())
}

/// A heading's anchor as GitHub makes it: lowercase, spaces to `-`, punctuation dropped.
fn anchor(heading: &str) -> String {
    let text = heading.trim_start_matches('#').trim().to_lowercase();
    text.chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Dashboards
// ---------------------------------------------------------------------------------------------------------

/// One PromQL query of a dashboard: where it is, and its text with Grafana's variables left in.
struct Query {
    dashboard: &'static str,
    panel: String,
    expr: String,
    variables: BTreeSet<String>,
}

/// Every query of the dashboards (targets, and the metric selector of `label_values(...)` variables), and
/// what is wrong with the dashboards otherwise (a panel, target or variable that does not read the
/// `datasource` variable, a missing `datasource` variable, ids and uids that are not unique).
fn dashboard_queries() -> anyhow::Result<(Vec<Query>, Vec<String>)> {
    let datasource = json!({ "type": "prometheus", "uid": "${datasource}" });
    let (mut queries, mut problems, mut uids) = (Vec::new(), Vec::new(), BTreeSet::new());
    for dashboard in DASHBOARDS {
        let text = read(&format!("deploy/grafana/dashboards/{dashboard}"))?;
        let doc: Value = serde_json::from_str(&text).with_context(|| format!("{dashboard} is not valid JSON"))?;
        if !uids.insert(doc["uid"].as_str().unwrap_or_default().to_owned()) {
            problems.push(format!("{dashboard}: its uid is missing or another dashboard's"));
        }
        let variables = doc["templating"]["list"].as_array().cloned().unwrap_or_default();
        let names: BTreeSet<String> = variables.iter().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect();
        if !variables
            .iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus")
        {
            problems.push(format!("{dashboard}: no `datasource` variable of type datasource, query prometheus"));
        }
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            let name = variable["name"].as_str().unwrap_or_default();
            if variable["datasource"] != datasource {
                problems.push(format!("{dashboard}: variable {name} does not read ${{datasource}}"));
            }
            let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).unwrap_or_default();
            let selector = query.strip_prefix("label_values(").and_then(|args| args.rsplit_once(',')).map(|(s, _)| s);
            match selector {
                Some(selector) => queries.push(Query {
                    dashboard,
                    panel: format!("variable {name}"),
                    expr: selector.to_owned(),
                    variables: names.clone(),
                }),
                None => problems.push(format!("{dashboard}: variable {name} is not label_values(metric, label)")),
            }
        }
        let mut panels = doc["panels"].as_array().cloned().unwrap_or_default();
        let mut ids = BTreeSet::new();
        while let Some(panel) = panels.pop() {
            panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            if !ids.insert(panel["id"].as_u64().unwrap_or(0)) {
                problems.push(format!("{dashboard}: panel {title:?} has no id or another panel's"));
            }
            if panel["type"] == "row" {
                continue;
            }
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if panel["datasource"] != datasource || targets.is_empty() {
                problems.push(format!("{dashboard}: panel {title:?} does not query ${{datasource}}"));
            }
            for target in targets {
                if target["datasource"] != datasource {
                    problems.push(format!("{dashboard}: a target of panel {title:?} does not read ${{datasource}}"));
                }
                match target["expr"].as_str() {
                    Some(expr) => queries.push(Query {
                        dashboard,
                        panel: title.clone(),
                        expr: expr.to_owned(),
                        variables: names.clone(),
                    }),
                    None => problems.push(format!("{dashboard}: a target of panel {title:?} has no expr")),
                }
            }
        }
    }
    Ok((queries, problems))
}

#[test]
fn dashboards_read_the_datasource_variable() -> anyhow::Result<()> {
    let (_, problems) = dashboard_queries()?;
    ensure!(problems.is_empty(), "dashboards:\n  {}", problems.join("\n  "));
    Ok(())
}

/// All queries, variables substituted, go into one rules file as recording rules `dashboard:check:N`;
/// promtool names each rule it cannot parse, and the failure names its dashboard and panel.
#[test]
fn every_dashboard_query_is_valid_promql() -> anyhow::Result<()> {
    let (queries, _) = dashboard_queries()?;
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for (n, query) in queries.iter().enumerate() {
        match substitute_variables(&query.expr, &query.variables) {
            Ok(expr) => rules.push(json!({ "record": format!("dashboard:check:{n}"), "expr": expr })),
            Err(error) => problems.push(format!("{} / {}: {error}: {}", query.dashboard, query.panel, query.expr)),
        }
    }
    let file = tempfile::Builder::new().suffix(".yml").tempfile()?;
    std::fs::write(
        file.path(),
        serde_yaml_ng::to_string(&json!({ "groups": [{ "name": "dashboards", "rules": rules }] }))?,
    )?;
    let path = file.path().to_str().context("temporary path")?;
    let output = promtool(&["check", "rules", path], None)?;
    if !output.status.success() {
        let text = output_text(&output);
        for line in text.lines() {
            let Some(n) = line.split("\"dashboard:check:").nth(1).and_then(|rest| rest.split('"').next()) else {
                continue;
            };
            let query = n.parse::<usize>().ok().and_then(|n| queries.get(n)).context("a rule promtool named")?;
            let error = line.rsplit_once("could not parse expression: ").map_or(line, |(_, error)| error);
            problems.push(format!("{} / {}: {error}\n    {}", query.dashboard, query.panel, query.expr));
        }
        ensure!(!problems.is_empty(), "promtool check rules failed on the dashboards' queries:\n{text}");
    }
    ensure!(problems.is_empty(), "invalid dashboard queries:\n  {}", problems.join("\n  "));
    Ok(())
}

#[test]
fn dashboards_and_alerts_name_only_catalogued_metrics() -> anyhow::Result<()> {
    let allowed = allowed_names(&catalogue()?);
    let mut uses: Vec<(String, String)> = Vec::new(); // (where, expression)
    for query in dashboard_queries()?.0 {
        uses.push((format!("{} / {}", query.dashboard, query.panel), query.expr));
    }
    for rule in alert_rules()? {
        let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap_or_default();
        uses.push((format!("alerts.yml / {name}"), rule["expr"].as_str().unwrap_or_default().to_owned()));
    }
    let tests = yaml("deploy/prometheus/alerts_test.yml")?;
    for case in tests["tests"].as_array().into_iter().flatten() {
        for series in case["input_series"].as_array().into_iter().flatten() {
            let series = series["series"].as_str().unwrap_or_default().to_owned();
            uses.push((format!("alerts_test.yml / {}", case["name"].as_str().unwrap_or_default()), series));
        }
    }
    let mut unknown = Vec::new();
    for (place, expr) in &uses {
        for name in metric_names(expr).difference(&allowed) {
            unknown.push(format!("{place}: {name}"));
        }
    }
    ensure!(unknown.is_empty(), "metric names not in docs/observability.md:\n  {}", unknown.join("\n  "));
    Ok(())
}

#[test]
fn grafana_provisioning_mounts_the_dashboards_and_a_prometheus_source() -> anyhow::Result<()> {
    let provider = yaml("deploy/grafana/provisioning/dashboards/switchboard.yaml")?;
    let path = provider["providers"][0]["options"]["path"].as_str().context("no dashboards path")?;
    let readme = read("deploy/README.md")?;
    ensure!(readme.contains(&format!("dashboards:{path}")), "deploy/README.md does not mount the dashboards at {path}");
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")?;
    ensure!(datasources["datasources"][0]["type"] == "prometheus", "the provisioned data source is not Prometheus");
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// The live exposition
// ---------------------------------------------------------------------------------------------------------

/// The demo tenant, with `support` push-routed so that offers happen, and a license limit.
const CONFIG: &str = r#"
version: 1
license:
  max_sessions: 50
presence:
  customer_grace_ms: 1000
tenants:
  - id: demo
    name: Demo Company
    widget_keys: [demo-widget-key]
    groups:
      - { id: sales, name: Sales }
      - { id: support, name: Support, routing: { mode: push, offer_timeout_ms: 30000 } }
    agents:
      - { id: alice, name: Alice, token: demo-alice-token, groups: [sales, support], capacity: 3 }
      - { id: bob, name: Bob, token: demo-bob-token, groups: [sales], capacity: 2 }
"#;
const WIDGET: &str = "demo-widget-key";
/// How long metrics updated on a timer (lease renewals every 2 s) get to show up.
const METRICS_DEADLINE: Duration = Duration::from_secs(10);

/// `GET /metrics` over HTTP/1.0 (no chunked encoding): the status line, the content type and the body.
async fn scrape(address: &str) -> anyhow::Result<(String, String, String)> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await??;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP header in the response")?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    let content_type = head
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("content-type")))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    Ok((status, content_type, body.to_owned()))
}

#[test]
fn the_exposition_is_compared_with_the_catalogue_by_type_and_label_names() {
    let exposition = Exposition::parse(
        "# HELP a_total A.\n# TYPE a_total counter\na_total{code=\"ok\",method=\"x,y=\\\"z\\\"\"} 1\n\
         # TYPE b_seconds histogram\nb_seconds_bucket{le=\"+Inf\"} 2\nb_seconds_sum 0.5\nb_seconds_count 2\n",
    );
    assert_eq!(exposition.types["a_total"], "counter");
    assert_eq!(exposition.label_names("a_total"), [BTreeSet::from(["code".to_owned(), "method".to_owned()])]);
    assert_eq!(exposition.label_names("b_seconds_bucket"), [BTreeSet::from(["le".to_owned()])]);
    let catalogued = |name: &str, kind: &str, labels: &[&str]| Catalogued {
        name: name.to_owned(),
        kind: kind.to_owned(),
        labels: labels.iter().map(|label| label.to_string()).collect(),
        section: String::new(),
    };
    let (a, b, c) = (
        catalogued("a_total", "counter", &["code"]),
        catalogued("b_seconds", "histogram", &[]),
        catalogued("c", "gauge", &[]),
    );
    let (missing, wrong_types, wrong_labels) = compare_with_catalogue(&exposition, &[&a, &b, &c]);
    assert_eq!(missing, ["c"]);
    assert!(wrong_types.is_empty(), "{wrong_types:?}");
    assert_eq!(wrong_labels.len(), 1, "{wrong_labels:?}");
}

/// What the exposition lacks or gets wrong against the catalogue: (missing names, wrong types, wrong labels).
fn compare_with_catalogue(
    exposition: &Exposition,
    catalogue: &[&Catalogued],
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut missing, mut wrong_types, mut wrong_labels) = (Vec::new(), Vec::new(), Vec::new());
    for metric in catalogue {
        let series: Vec<String> = match metric.kind.as_str() {
            "histogram" => {
                ["_bucket", "_sum", "_count"].iter().map(|suffix| format!("{}{suffix}", metric.name)).collect()
            }
            _ => vec![metric.name.clone()],
        };
        if series.iter().any(|name| !exposition.has(name)) {
            missing.push(metric.name.clone());
            continue;
        }
        let declared = exposition.types.get(&metric.name).map_or("nothing", String::as_str);
        if declared != metric.kind {
            wrong_types.push(format!("{}: TYPE {declared}, catalogued as {}", metric.name, metric.kind));
        }
        for name in &series {
            for labels in exposition.label_names(name) {
                let labels: BTreeSet<String> = labels.iter().filter(|label| *label != "le").cloned().collect();
                if labels != metric.labels {
                    wrong_labels.push(format!("{name}: labels {labels:?}, catalogued {:?}", metric.labels));
                    break;
                }
            }
        }
    }
    (missing, wrong_types, wrong_labels)
}

/// A little of everything: a pull-routed chat accepted, messages both ways, its customer gone, closed; a push-routed chat
/// offered and accepted; refused requests; one call of the public gRPC API. The clients stay connected.
async fn drive_traffic(server: &Server) -> anyhow::Result<Vec<Client>> {
    let url = server.ws_url();
    let mut alice = Client::sign_in(&url, "demo-alice-token").await?;
    alice.push_of("queue.snapshot").await?;

    let (mut ann, chat, _) = Client::start_chat(&url, WIDGET, "sales", "Ann", "Where is my order?").await?;
    alice.ok("chat.accept", json!({ "conversation": chat })).await?;
    alice.ok("message.send", json!({ "conversation": chat, "client_msg_id": "a-1", "body": "Hello Ann" })).await?;
    ann.event_of(&chat, "message").await?;
    ann.ok("message.send", json!({ "conversation": chat, "client_msg_id": "c-1", "body": "Thanks!" })).await?;
    alice
        .push_matching(|f| {
            f["type"] == "event" && f["event"]["kind"] == "message" && f["event"]["author"]["role"] == "customer"
        })
        .await?;
    // Ann closes the tab: a grace period later, Alice is told she left; then Alice closes the chat.
    drop(ann);
    alice.event_of(&chat, "customer_left").await?;
    alice.ok("chat.close", json!({ "conversation": chat })).await?;

    let (dana, offered, _) = Client::start_chat(&url, WIDGET, "support", "Dana", "My parcel is late.").await?;
    let offer = alice.push_of("offer").await?;
    ensure!(offer["entry"]["conversation"] == *offered, "unexpected offer {offer}");
    alice.ok("chat.accept", json!({ "conversation": offered })).await?;

    let mut stranger = Client::connect(&url).await?;
    let start = json!({ "widget_key": WIDGET, "group": "nowhere", "name": "Eve", "question": "Anyone?" });
    let code = stranger.refused("chat.start", start).await?;
    ensure!(code == "unknown_group", "a chat in a group that does not exist refused with {code}");
    let code = stranger.refused("no.such.request", json!({})).await?;
    ensure!(code == "unknown_type", "a request of no known type refused with {code}");

    grpc_ping(&server.address).await?;
    grpc_made_up_method(&server.address).await?;
    Ok(vec![alice, dana, stranger])
}

/// One `switchboard.v1.ChatService/Session`: a ping, its ack, and the stream's end with OK.
async fn grpc_ping(address: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect().await?;
    let ping = pb::ClientFrame { id: "1".into(), request: Some(pb::client_frame::Request::Ping(pb::PingRequest {})) };
    let mut client = pb::chat_service_client::ChatServiceClient::new(channel);
    let mut frames = client.session(futures_util::stream::iter([ping])).await?.into_inner();
    let mut received = 0;
    while tokio::time::timeout(Duration::from_secs(10), frames.message()).await??.is_some() {
        received += 1;
    }
    ensure!(received == 2, "expected a welcome and an ack over gRPC, got {received} frames");
    Ok(())
}

/// A method of the client's own making, on the public service's path.
const MADE_UP_METHOD: &str = "/switchboard.v1.ChatService/MadeUpByTheClient";

/// One call of [`MADE_UP_METHOD`]: UNIMPLEMENTED.
async fn grpc_made_up_method(address: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))?.connect().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<pb::PingRequest, pb::PingRequest>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(MADE_UP_METHOD);
    let answer = grpc.unary(tonic::Request::new(pb::PingRequest {}), path, codec).await;
    ensure!(
        answer.as_ref().is_err_and(|status| status.code() == tonic::Code::Unimplemented),
        "a made-up method answered {answer:?}"
    );
    Ok(())
}

/// What the figures of `serve` must say once [`drive_traffic`] has run; `Err` lists what does not hold (yet).
fn figures_hold(exposition: &Exposition) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let mut expect = |name: &str, with: &[(&str, &str)], holds: fn(f64) -> bool, wanted: &str| {
        let value = exposition.total(name, with);
        if !holds(value) {
            let labels: Vec<String> = with.iter().map(|(key, value)| format!("{key}=\"{value}\"")).collect();
            problems.push(format!("{name}{{{}}} is {value}, expected {wanted}", labels.join(",")));
        }
    };
    let demo = |group| [("tenant", "demo"), ("group", group)];
    // The license: Dana's chat holds a permit (Ann's was closed) of the 50.
    expect("switchboard_license_sessions_in_use", &[], |v| v == 1.0, "1");
    expect("switchboard_license_sessions_max", &[], |v| v == 50.0, "50");
    // Queues and routing: one chat started in each group, both accepted, nothing left waiting.
    expect("switchboard_chats_started_total", &demo("sales"), |v| v == 1.0, "1");
    expect("switchboard_chats_started_total", &demo("support"), |v| v == 1.0, "1");
    expect("switchboard_chats_finished_total", &[("group", "sales"), ("reason", "closed")], |v| v == 1.0, "1");
    expect("switchboard_customers_left_total", &demo("sales"), |v| v == 1.0, "1 (Ann)");
    expect("switchboard_queue_waiting_chats", &[], |v| v == 0.0, "0");
    expect("switchboard_queue_wait_seconds_count", &demo("sales"), |v| v == 1.0, "1");
    expect("switchboard_queue_wait_seconds_count", &demo("support"), |v| v == 1.0, "1");
    // The demo's groups have the default SLA, 120 s, which nobody waited for.
    expect("switchboard_queue_wait_sla_seconds", &demo("sales"), |v| v == 120.0, "120");
    expect("switchboard_queue_sla_breached_chats", &[], |v| v == 0.0, "0");
    expect("switchboard_queue_sla_breaches_total", &[], |v| v == 0.0, "0");
    expect("switchboard_group_open", &demo("support"), |v| v == 1.0, "1");
    expect("switchboard_group_agents_online", &demo("support"), |v| v == 1.0, "1 (Alice)");
    expect("switchboard_group_agents_signed_in", &demo("sales"), |v| v == 1.0, "1 (Alice)");
    // Latencies: the push offer of Dana's chat, and the two messages, each timed as it reached the other side.
    expect("switchboard_offer_latency_seconds_count", &[], |v| v == 1.0, "1");
    expect("switchboard_offers_ended_total", &[("reason", "accepted")], |v| v == 1.0, "1");
    expect("switchboard_message_latency_seconds_count", &[], |v| v == 2.0, "2");
    // The gateway: who is connected, what was asked, what was refused and why.
    let websocket = |role| [("transport", "websocket"), ("role", role)];
    expect("switchboard_gateway_connections", &websocket("agent"), |v| v == 1.0, "1 (Alice)");
    expect("switchboard_gateway_connections", &websocket("customer"), |v| v == 1.0, "1 (Dana; Ann left)");
    expect("switchboard_gateway_connections", &websocket("none"), |v| v == 1.0, "1 (the stranger)");
    expect("switchboard_gateway_requests_total", &[("type", "message.send")], |v| v == 2.0, "2");
    expect("switchboard_gateway_refusals_total", &[("reason", "unknown_group")], |v| v == 1.0, "1");
    expect("switchboard_gateway_refusals_total", &[("reason", "unknown_type")], |v| v == 1.0, "1");
    expect("switchboard_gateway_requests_total", &[("type", "invalid")], |v| v == 1.0, "1 (no.such.request)");
    let session = [("service", "switchboard.v1.ChatService"), ("method", "Session"), ("code", "ok")];
    expect("switchboard_grpc_server_requests_total", &session, |v| v == 1.0, "1");
    expect("switchboard_grpc_server_streams_ended_total", &session, |v| v == 1.0, "1 (it ended with OK)");
    // The router and the store.
    expect("switchboard_router_shards_owned", &[], |v| v == 1024.0, "1024");
    expect("switchboard_router_actors", &[("kind", "queue")], |v| v == 2.0, "2");
    expect("switchboard_router_actors", &[("kind", "agent")], |v| v >= 1.0, "at least 1");
    expect("switchboard_router_actors", &[("kind", "conversation")], |v| v >= 1.0, "at least 1");
    // Two creations (Dana's with its offer to Alice, free then), two acceptances, two messages and a close, at
    // least.
    expect("switchboard_store_appends_total", &[("outcome", "stored")], |v| v >= 7.0, "at least 7");
    expect("switchboard_store_append_duration_seconds_count", &[], |v| v >= 7.0, "at least 7");
    expect("switchboard_store_append_batch_size_count", &[], |v| v >= 1.0, "at least 1");
    expect("switchboard_store_writer_failed", &[], |v| v == 0.0, "0");
    // The process.
    expect("switchboard_build_info", &[("role", "serve")], |v| v == 1.0, "1");
    expect("process_cpu_seconds_total", &[], |v| v > 0.0, "above 0");
    expect("process_resident_memory_bytes", &[], |v| v > 0.0, "above 0");
    if problems.is_empty() { Ok(()) } else { Err(problems) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_server_exposes_every_catalogued_metric_lints_clean_and_says_what_happened() -> anyhow::Result<()> {
    promtool(&["--version"], None)?;
    let catalogue = catalogue()?;
    let served: Vec<&Catalogued> =
        catalogue.iter().filter(|metric| SERVED_SECTIONS.contains(&metric.section.as_str())).collect();
    for section in SERVED_SECTIONS {
        ensure!(served.iter().any(|m| m.section == section), "docs/observability.md has no `### {section}` metrics");
    }
    let data = tempfile::tempdir()?;
    let server = Server::start(CONFIG, data.path()).await?;
    let _clients = drive_traffic(&server).await?;

    // Some figures change on timers (lease renewals): scrape until every name is there, or the deadline.
    let deadline = tokio::time::Instant::now() + METRICS_DEADLINE;
    let (status, content_type, body, missing, wrong_types, wrong_labels, figures) = loop {
        let (status, content_type, body) = scrape(&server.address).await?;
        let exposition = Exposition::parse(&body);
        let (missing, wrong_types, wrong_labels) = compare_with_catalogue(&exposition, &served);
        let figures = figures_hold(&exposition);
        let served_metrics = status.contains(" 200 ");
        if (missing.is_empty() && figures.is_ok()) || !served_metrics || tokio::time::Instant::now() >= deadline {
            break (status, content_type, body, missing, wrong_types, wrong_labels, figures);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let lint = promtool(&["check", "metrics"], Some(&body))?;
    let lint_text = output_text(&lint);

    let mut failures = Vec::new();
    if !status.contains(" 200 ") {
        failures.push(format!("GET /metrics answered {status:?}"));
    }
    if !(content_type.starts_with("text/plain") && content_type.contains("version=0.0.4")) {
        failures.push(format!("content type {content_type:?}, expected text/plain; version=0.0.4"));
    }
    if !lint.status.success() || !lint_text.trim().is_empty() {
        failures.push(format!("promtool check metrics ({}):\n{}", lint.status, lint_text.trim_end()));
    }
    if !missing.is_empty() {
        failures.push(format!("catalogued metrics missing from /metrics:\n  {}", missing.join("\n  ")));
    }
    if !wrong_types.is_empty() {
        failures.push(format!("metrics whose TYPE differs from the catalogue:\n  {}", wrong_types.join("\n  ")));
    }
    if !wrong_labels.is_empty() {
        failures.push(format!("metrics whose labels differ from the catalogue:\n  {}", wrong_labels.join("\n  ")));
    }
    if let Err(problems) = figures {
        failures.push(format!("the figures do not say what the traffic did:\n  {}", problems.join("\n  ")));
    }
    // The labels are bounded whatever the clients send: a made-up method is `unknown`.
    let made_up = MADE_UP_METHOD.rsplit('/').next().unwrap_or(MADE_UP_METHOD);
    if body.contains(made_up) {
        failures.push(format!("a client's made-up method {made_up} became a label"));
    }
    let unknown = r#"service="unknown",method="unknown",code="unimplemented""#;
    if !body.lines().any(|line| line.starts_with("switchboard_grpc_server_requests_total{") && line.contains(unknown)) {
        failures.push(format!("no call counted with {unknown}"));
    }
    if !body.is_empty() && !failures.is_empty() {
        failures.push(format!("(the exposition is saved in {})", save_exposition(&body)));
    }
    ensure!(
        failures.is_empty(),
        "/metrics of `switchboard serve` against docs/observability.md:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Keeps a failing exposition for a look after the test (the data directory is removed).
fn save_exposition(body: &str) -> String {
    let path = std::env::temp_dir().join(format!("switchboard-metrics-{}.txt", std::process::id()));
    match std::fs::write(&path, body) {
        Ok(()) => path.display().to_string(),
        Err(error) => format!("nowhere: {error}"),
    }
}
