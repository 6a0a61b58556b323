//! A Prometheus text exposition, read once: the `# TYPE` of each family and every sample with its labels and
//! value. For the tests that check a process's `/metrics` against the catalogue and against what happened.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The families' types and the samples of one exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → its `# TYPE` (`counter`, `gauge`, `histogram`, …).
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Reads the text format. Label values are unescaped (`\\`, `\"`, `\n`) and may hold commas and `=`;
    /// a line that cannot be read as a sample is left out.
    pub fn parse(text: &str) -> Exposition {
        let mut exposition = Exposition::default();
        for line in text.lines().map(str::trim).filter(|line| !line.is_empty()) {
            if let Some(declaration) = line.strip_prefix("# TYPE ") {
                if let Some((name, kind)) = declaration.split_once(' ') {
                    exposition.types.insert(name.to_owned(), kind.trim().to_owned());
                }
            } else if !line.starts_with('#')
                && let Some(sample) = sample(line)
            {
                exposition.samples.push(sample);
            }
        }
        exposition
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|sample| sample.name == name)
    }

    /// The label names of each sample named `name`.
    pub fn label_names(&self, name: &str) -> Vec<BTreeSet<String>> {
        self.named(name).map(|sample| sample.labels.keys().cloned().collect()).collect()
    }

    /// The sum of `name` over the samples whose labels include every one of `with` (0 when there is none).
    pub fn total(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|sample| {
                with.iter().all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
            })
            .map(|sample| sample.value)
            // A sum of nothing is -0.0: 0 reads better in a failure.
            .sum::<f64>()
            + 0.0
    }

    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| sample.name == name)
    }
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let (name, mut rest) = (&line[..name_end], &line[name_end..]);
    let mut labels = BTreeMap::new();
    if let Some(inside) = rest.strip_prefix('{') {
        rest = inside;
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after_key) = rest.split_once('=')?;
            let (value, after_value) = quoted(after_key.trim_start().strip_prefix('"')?)?;
            labels.insert(key.trim().to_owned(), value);
            rest = after_value;
        }
    }
    // The value, then an optional timestamp.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name: name.to_owned(), labels, value })
}

/// A label value after its opening quote: the unescaped value, and what follows its closing quote.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => value.push(match chars.next()?.1 {
                'n' => '\n',
                other => other,
            }),
            other => value.push(other),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_labels_with_commas_and_quotes_and_values_are_read() {
        let exposition = Exposition::parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{code=\"ok\",method=\"x,y=\\\"z\\\"\"} 1\n\
             a_total{code=\"unknown\",method=\"m\"} 2 1700000000000\n\
             # TYPE b_seconds histogram\nb_seconds_bucket{le=\"+Inf\"} 2\nb_seconds_sum 0.5\nb_seconds_count 2\n",
        );
        assert_eq!(exposition.types["a_total"], "counter");
        assert_eq!(exposition.label_names("a_total")[0], BTreeSet::from(["code".to_owned(), "method".to_owned()]));
        assert_eq!(exposition.samples[0].labels["method"], "x,y=\"z\"");
        assert_eq!(exposition.label_names("b_seconds_bucket"), [BTreeSet::from(["le".to_owned()])]);
        assert_eq!(exposition.total("a_total", &[]), 3.0);
        assert_eq!(exposition.total("a_total", &[("code", "ok")]), 1.0);
        assert_eq!(exposition.total("b_seconds_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(exposition.total("b_seconds_sum", &[]), 0.5);
        assert!(exposition.has("b_seconds_count") && !exposition.has("c"));
        assert_eq!(exposition.total("c", &[]).to_string(), "0");
    }
}
