//! One customer message is one OpenTelemetry trace across the processes it crosses: the request span of the
//! gateway the customer is connected to, the router's gRPC server span, the conversation actor's span on the
//! same router, and the delivery span of the gateway the agent is connected to, each an ancestor of the next by
//! `parent_span_id` within one trace; the store's span of the message's append is a child of the actor's.
//! Every process exports to an OTLP receiver in this test; processes are told apart by the resource
//! (`service.name`, `process.pid`). The gateway's request span is exported under the request's type
//! (`otel.name`), so the `gateway.request` span of a message is the server span `message.send`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use switchboard_cluster_tests::{Cluster, ClusterSpec, Process};
use switchboard_e2e::{Client, SEED_CONFIG};
use switchboard_testservices::{OtlpReceiver, ReceivedSpan};

const WIDGET: &str = "acme-widget-key";
/// A guard against spans that never come, not a wait: the receiver wakes the test on each export.
const SPANS_DEADLINE: Duration = Duration::from_secs(30);
/// Each process exports its finished spans every 100 ms (instead of the SDK's default 5 s).
const EXPORT_EVERY_MS: &str = "100";
/// At most this many spans in a failure's dump.
const DUMPED_SPANS: usize = 300;

/// Who should have made which span of the message's trace.
struct Expected {
    conversation: String,
    seq: u64,
    customer_gateway_pid: String,
    agent_gateway_pid: String,
    owner_router_pid: String,
}

fn pid(span: &ReceivedSpan) -> Option<&str> {
    span.resource.get("process.pid").map(String::as_str)
}

fn is_from(span: &ReceivedSpan, service: &str, expected_pid: &str) -> bool {
    span.service_name() == Some(service) && pid(span) == Some(expected_pid)
}

/// The message's request on the customer's gateway: a server span named after the request type.
fn is_message_request(span: &ReceivedSpan, expected: &Expected) -> bool {
    span.name == "message.send"
        && span.kind == "server"
        && is_from(span, "switchboard-gateway", &expected.customer_gateway_pid)
}

/// The message's trace from its delivery on the agent's gateway up to its root, leaf first; `Err` says what
/// is missing or wrong (spans still on their way make it missing, and the receiver is asked again).
fn message_trace<'a>(spans: &'a [ReceivedSpan], expected: &Expected) -> Result<Vec<&'a ReceivedSpan>, String> {
    let delivery = spans
        .iter()
        .find(|span| {
            span.name == "gateway.deliver"
                && is_from(span, "switchboard-gateway", &expected.agent_gateway_pid)
                && span.attribute("conversation") == Some(expected.conversation.as_str())
                && span.attribute("seq") == Some(expected.seq.to_string().as_str())
        })
        .ok_or_else(|| format!("no gateway.deliver of seq {} from the agent's gateway yet", expected.seq))?;
    let in_trace: HashMap<&str, &ReceivedSpan> = spans
        .iter()
        .filter(|span| span.trace_id == delivery.trace_id)
        .map(|span| (span.span_id.as_str(), span))
        .collect();
    let mut path = vec![delivery];
    while let Some(parent_id) = path[path.len() - 1].parent_span_id.as_deref() {
        let parent = in_trace.get(parent_id).ok_or_else(|| {
            format!("the parent {parent_id} of {} is not (yet) in trace {}", path[path.len() - 1], delivery.trace_id)
        })?;
        if path.len() > in_trace.len() {
            return Err(format!("the parent links of trace {} make a cycle", delivery.trace_id));
        }
        path.push(parent);
    }
    Ok(path)
}

/// Checks the chain on the path from the delivery (first) to the root (last): request → gRPC server →
/// conversation command → delivery, each later one a descendant of the one before. Returns the store's span
/// of the message's append, a child of the conversation command in the same trace (off the path).
fn check_chain<'a>(
    spans: &'a [ReceivedSpan],
    path: &[&ReceivedSpan],
    expected: &Expected,
) -> Result<&'a ReceivedSpan, String> {
    let position = |what: &str, after: usize, matches: &dyn Fn(&ReceivedSpan) -> bool| {
        path.iter()
            .enumerate()
            .skip(after + 1)
            .find(|(_, span)| matches(span))
            .map(|(at, _)| at)
            .ok_or_else(|| format!("no {what} among the ancestors of the delivery (above position {after})"))
    };
    let router = &expected.owner_router_pid;
    let command = position("conversation.command of the owner router", 0, &|span| {
        span.name == "conversation.command"
            && is_from(span, "switchboard-router", router)
            && span.attribute("conversation") == Some(expected.conversation.as_str())
    })?;
    position("RouterService/Command grpc.server span of the owner router", command, &|span| {
        span.kind == "server"
            && is_from(span, "switchboard-router", router)
            && span.attribute("rpc.service") == Some("switchboard.internal.v1.RouterService")
            && span.attribute("rpc.method") == Some("Command")
    })?;
    let root = path[path.len() - 1];
    if !is_message_request(root, expected) {
        return Err(format!("the root of the trace is not the customer gateway's message.send request: {root}"));
    }
    let command = path[command];
    spans
        .iter()
        .find(|span| {
            span.trace_id == command.trace_id
                && span.parent_span_id.as_deref() == Some(command.span_id.as_str())
                && span.kind == "server"
                && span.service_name() == Some("switchboard-store")
                && span.attribute("rpc.method") == Some("Append")
        })
        .ok_or_else(|| format!("no StoreService/Append span of the store under {command} yet"))
}

/// Every span received (at most [`DUMPED_SPANS`]), by trace, the trace of the customer's message request
/// first, with the processes' names for their pids.
fn dump(spans: &[ReceivedSpan], expected: &Expected, names: &BTreeMap<String, String>) -> String {
    let message_trace = spans.iter().find(|span| is_message_request(span, expected)).map(|span| &span.trace_id);
    let mut sorted: Vec<&ReceivedSpan> = spans.iter().collect();
    sorted.sort_by_key(|span| (Some(&span.trace_id) != message_trace, &span.trace_id));
    let mut text = format!("{} spans received; processes by pid: {names:?}\n", spans.len());
    for span in sorted.iter().take(DUMPED_SPANS) {
        let name = pid(span).and_then(|pid| names.get(pid)).map_or("?", String::as_str);
        let _ = writeln!(text, "  [{name}] {span}");
    }
    if sorted.len() > DUMPED_SPANS {
        let _ = writeln!(text, "  ... and {} more", sorted.len() - DUMPED_SPANS);
    }
    text
}

fn pid_of(process: &Process) -> anyhow::Result<String> {
    Ok(process.pid().with_context(|| format!("{} has no pid", process.name))?.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_message_is_one_trace_from_the_customers_gateway_to_the_agents() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let mut spec = ClusterSpec::new(SEED_CONFIG);
    spec.routers = 2;
    spec.env = vec![
        ("SWITCHBOARD_OTLP_ENDPOINT".to_owned(), receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), EXPORT_EVERY_MS.to_owned()),
    ];
    let cluster = Cluster::start(spec).await?;
    let urls = cluster.gateway_urls();
    let (customer_gateway, agent_gateway) = (&urls[0], &urls[1]);

    // The agent on gateway B accepts the chat of a customer on gateway A; the customer sends one message,
    // which reaches the agent live on B.
    let mut agent = Client::sign_in(agent_gateway, "token-agent-b").await?;
    let (mut customer, chat, _) =
        Client::start_chat(customer_gateway, WIDGET, "g1", "Ann", "where is my order?").await?;
    agent.ok("chat.accept", json!({ "conversation": chat })).await?;
    customer.event_of(&chat, "accepted").await?;
    let ack =
        customer.ok("message.send", json!({ "conversation": chat, "client_msg_id": "c-1", "body": "Hello?" })).await?;
    let seq = ack["seq"].as_u64().with_context(|| format!("an ack without seq: {ack}"))?;
    let received = agent
        .push_matching(|frame| {
            frame["type"] == "event" && frame["conversation"] == chat && frame["event"]["seq"] == seq
        })
        .await?;
    assert_eq!(received["event"]["body"], "Hello?", "{received}");

    let owner = cluster.owner_of(&chat).await?;
    let owner = owner.live_owner().with_context(|| format!("{chat} has no live owner: {owner:?}"))?.to_owned();
    let names: BTreeMap<String, String> = cluster
        .stores
        .iter()
        .chain(&cluster.routers)
        .chain(&cluster.gateways)
        .map(|process| Ok((pid_of(process)?, process.name.clone())))
        .collect::<anyhow::Result<_>>()?;
    let expected = Expected {
        conversation: chat.clone(),
        seq,
        customer_gateway_pid: pid_of(&cluster.gateways[0])?,
        agent_gateway_pid: pid_of(&cluster.gateways[1])?,
        owner_router_pid: pid_of(cluster.routers.iter().find(|router| router.name == owner).context("no owner")?)?,
    };

    let chain = receiver
        .wait_for(SPANS_DEADLINE, |spans| {
            let path = message_trace(spans, &expected)?;
            let append = check_chain(spans, &path, &expected)?;
            Ok::<_, String>((path.into_iter().cloned().collect::<Vec<_>>(), append.clone()))
        })
        .await;
    let spans = receiver.spans();
    let (path, append) = match chain {
        Ok(found) => found,
        Err(missing) => {
            bail!(
                "the message's trace is not complete within {SPANS_DEADLINE:?}: {missing}\n{}",
                dump(&spans, &expected, &names)
            )
        }
    };
    // One message, one trace: the customer's gateway made one request span for it, the root of this trace.
    let requests: Vec<&ReceivedSpan> = spans.iter().filter(|span| is_message_request(span, &expected)).collect();
    assert_eq!(
        requests.len(),
        1,
        "one message.send request span on the customer's gateway:\n{}",
        dump(&spans, &expected, &names)
    );
    assert!(path.iter().chain([&append]).all(|span| span.trace_id == path[0].trace_id));
    let described: Vec<String> = path
        .iter()
        .rev()
        .chain([&append])
        .map(|span| format!("[{}] {span}", pid(span).and_then(|pid| names.get(pid)).map_or("?", String::as_str)))
        .collect();
    eprintln!("the message's trace, root first, then the store's append:\n  {}", described.join("\n  "));

    customer.close().await?;
    agent.close().await?;
    cluster.finish();
    Ok(())
}
