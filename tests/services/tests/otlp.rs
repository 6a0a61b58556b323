//! The receiver gets what the real OTLP/gRPC exporter (the one the binaries install) sends: spans with their
//! ids, parent, kind, attributes and resource.

use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SdkTracerProvider};
use switchboard_testservices::{OtlpReceiver, ReceivedSpan};

/// A guard against a lost export, not a wait: the receiver wakes the test on each export.
const DEADLINE: Duration = Duration::from_secs(20);

fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
    let batches = BatchConfigBuilder::default().with_scheduled_delay(Duration::from_millis(50)).build();
    let processor =
        BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio).with_batch_config(batches).build();
    let resource =
        Resource::builder().with_service_name("otlp-test").with_attribute(KeyValue::new("process.pid", 42)).build();
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Result<&'a ReceivedSpan, String> {
    spans.iter().find(|span| span.name == name).ok_or_else(|| format!("no span {name:?} among {spans:#?}"))
}

// Multi-thread: the provider's shutdown blocks its thread while the batch task (on another) flushes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_keeps_what_the_otlp_exporter_sends() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    assert!(receiver.endpoint().starts_with("http://127.0.0.1:"), "{}", receiver.endpoint());
    let provider = provider(&receiver.endpoint())?;
    let tracer = provider.tracer("otlp-test");
    let parent = tracer.span_builder("parent").with_kind(SpanKind::Server).start(&tracer);
    let context = opentelemetry::Context::current_with_span(parent);
    let mut child = tracer.start_with_context("child", &context);
    child.set_attribute(KeyValue::new("seq", 7));
    child.set_attribute(KeyValue::new("conversation", "c-1"));
    child.end();
    context.span().end();

    let (parent, child) = receiver
        .wait_for(DEADLINE, |spans| Ok::<_, String>((named(spans, "parent")?.clone(), named(spans, "child")?.clone())))
        .await
        .map_err(anyhow::Error::msg)?;
    assert_eq!(parent.trace_id.len(), 32, "{parent}");
    assert_eq!(parent.span_id.len(), 16, "{parent}");
    assert_eq!(parent.parent_span_id, None, "{parent}");
    assert_eq!(parent.kind, "server");
    assert_eq!(child.trace_id, parent.trace_id);
    assert_eq!(child.parent_span_id.as_deref(), Some(parent.span_id.as_str()));
    assert_eq!(child.kind, "internal");
    assert_eq!((child.attribute("seq"), child.attribute("conversation")), (Some("7"), Some("c-1")));
    for span in [&parent, &child] {
        assert_eq!(span.service_name(), Some("otlp-test"), "{span}");
        assert_eq!(span.resource.get("process.pid").map(String::as_str), Some("42"), "{span}");
    }
    assert_eq!(receiver.spans().len(), 2);
    tokio::task::block_in_place(|| provider.shutdown())?;
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_wait_that_is_not_met_ends_at_its_deadline_with_the_last_answer() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let mut checks = 0;
    let outcome = receiver
        .wait_for(Duration::from_secs(20), |spans| {
            checks += 1;
            if spans.is_empty() { Err(format!("nothing yet after {checks} checks")) } else { Ok(()) }
        })
        .await;
    // One check at the start and one at the deadline: nothing was exported in between.
    assert_eq!(outcome, Err("nothing yet after 2 checks".to_owned()));
    assert!(receiver.spans().is_empty());
    Ok(())
}
