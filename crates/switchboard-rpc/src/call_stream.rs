//! Unary calls multiplexed on one long-lived bidirectional stream, a *call stream*: the hot path of every
//! message (`RouterService.Commands`, `StoreService.Appends`).
//!
//! A unary gRPC call costs an HTTP/2 stream of its own: headers both ways, trailers, a task on the server,
//! and several writes on the socket. On a call stream a call is one message each way, and the calls ready
//! together share the writes. Each call carries an id the client chose and what a unary call carries in
//! its metadata ([`CallContext`]: the trace, the received-at moment); its result comes back with the id,
//! in any order, the failure as a [`CallError`] with the status a unary call would have answered.
//!
//! - **Client** ([`CallStream`]): the stream opens on the first call and again on the first call after it
//!   failed. A call has the request timeout. When the stream fails or ends, every call waiting on it fails
//!   `UNAVAILABLE` (like a unary call on a broken connection). A server that does not know the stream
//!   (`UNIMPLEMENTED`: an older version during a rolling upgrade) is remembered: the caller falls back to
//!   the unary call.
//! - **Server** ([`serve_call_stream`]): reads calls until the client ends its side or the server drains,
//!   runs each concurrently (up to 1,024 at once per stream), sends each result when it is ready, and ends
//!   after the last result of the calls it read. A call it did not read was not carried out: the client's
//!   retry is safe.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use switchboard_proto::internal::v1::{
    AppendCall, AppendRequest, AppendResponse, AppendResult, CallContext, CallError, CommandCall, CommandReply,
    CommandRequest, CommandResult, RouterCall, RouterCallResult, router_call, router_call_result,
};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::metadata::{KeyAndValueRef, MetadataKey, MetadataValue};
use tonic::{Code, Status, Streaming};
use tracing::debug;

use crate::serve::Draining;

/// The calls a client sends on its stream.
pub(crate) type Calls<C> = UnboundedReceiverStream<C>;

type Opening<R> = Pin<Box<dyn Future<Output = Result<Streaming<R>, Status>> + Send>>;

/// Opens the stream on the server: the generated client's bidirectional call.
pub(crate) type Open<C, R> = Arc<dyn Fn(Calls<C>) -> Opening<R> + Send + Sync>;

/// The metadata entries of a status that travel in a [`CallError`].
const METADATA_PREFIX: &str = "x-switchboard-";

/// How many results a server holds for a client slower to read them than the calls finish.
const RESULTS_BUFFER: usize = 1024;

/// How many calls of one stream a server runs at once; it reads the next call when one finishes (HTTP/2
/// flow control then holds the client back), as a connection's limit of concurrent streams bounds unary calls.
const CALLS_IN_FLIGHT: usize = 1024;

/// A message that answers one call on a call stream.
pub(crate) trait CallResult: Send + 'static {
    type Reply: Send + 'static;

    /// The id of the call it answers.
    fn id(&self) -> u64;

    fn into_outcome(self) -> Result<Self::Reply, Status>;
}

/// The client side of one call stream to one server.
pub(crate) struct CallStream<C, R: CallResult> {
    /// What the stream carries, for errors and logs.
    name: &'static str,
    open: Open<C, R>,
    /// How long opening the stream may take (a unary call's request timeout).
    open_timeout: Duration,
    link: Mutex<Option<Link<C, R::Reply>>>,
    next_id: AtomicU64,
    known: Arc<Known>,
}

/// Where [`CallStream::call_or_unary`] leaves a call.
pub(crate) enum Attempt<M, T> {
    /// It went on the stream: its outcome.
    Answered(Result<T, Status>),
    /// The server does not know the stream: make the unary call with this request.
    Unary(M),
}

/// What this client has learnt of the server's support for the stream.
#[derive(Default)]
struct Known {
    /// An opening succeeded, and none failed `UNIMPLEMENTED` since.
    supported: AtomicBool,
    /// An opening failed `UNIMPLEMENTED`.
    unsupported: AtomicBool,
}

impl<C, R: CallResult> std::fmt::Debug for CallStream<C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream").field("name", &self.name).finish_non_exhaustive()
    }
}

/// One opening of the stream: where calls are sent, and who waits for which answer. Dropping the sender
/// (the `CallStream` dropped, or a new link replacing this one) ends the client's side of the stream.
struct Link<C, T> {
    calls: mpsc::UnboundedSender<C>,
    waiting: Arc<Mutex<Waiting<T>>>,
}

impl<C, T> Clone for Link<C, T> {
    fn clone(&self) -> Self {
        Link { calls: self.calls.clone(), waiting: self.waiting.clone() }
    }
}

struct Waiting<T> {
    /// The stream failed or ended: nothing more is answered on it.
    closed: bool,
    calls: HashMap<u64, oneshot::Sender<Result<T, Status>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<C: Send + 'static, R: CallResult> CallStream<C, R> {
    pub(crate) fn new(name: &'static str, open_timeout: Duration, open: Open<C, R>) -> Self {
        CallStream {
            name,
            open,
            open_timeout,
            link: Mutex::new(None),
            next_id: AtomicU64::new(1),
            known: Arc::default(),
        }
    }

    /// Whether the server knows the stream (as far as this client has seen: until the first opening fails
    /// with `UNIMPLEMENTED`).
    pub(crate) fn supported(&self) -> bool {
        !self.known.unsupported.load(Ordering::Relaxed)
    }

    /// Whether the server is known to have the stream (an opening succeeded): a caller need not keep a copy
    /// of its request for the unary fallback.
    pub(crate) fn known_supported(&self) -> bool {
        self.known.supported.load(Ordering::Relaxed)
    }

    /// Sends the call `make` builds from its id and context, and waits for its result up to `timeout`.
    /// `UNIMPLEMENTED` means the server does not know the stream: make the unary call instead.
    pub(crate) async fn call(
        &self,
        timeout: Duration,
        make: impl FnOnce(u64, CallContext) -> C,
    ) -> Result<R::Reply, Status> {
        if !self.supported() {
            return Err(Status::unimplemented(format!("the server has no {} stream", self.name)));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, answered) = oneshot::channel();
        let link = self.link();
        {
            let mut waiting = lock(&link.waiting);
            if waiting.closed {
                return Err(Status::unavailable(format!("the {} stream failed; retry", self.name)));
            }
            waiting.calls.insert(id, answer);
        }
        let context = CallContext {
            traceparent: switchboard_telemetry::trace::current_traceparent().unwrap_or_default(),
            received_at_us: switchboard_telemetry::trace::received_at_us().unwrap_or(0),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        };
        // When the stream is gone already, so is the call: the task that saw it end answers every call
        // waiting (this one included) with why it ended.
        let _ = link.calls.send(make(id, context));
        match tokio::time::timeout(timeout, answered).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(Status::unavailable(format!("the {} stream ended; retry", self.name))),
            Err(_) => {
                lock(&link.waiting).calls.remove(&id);
                Err(Status::deadline_exceeded(format!("no answer within {timeout:?}")))
            }
        }
    }

    /// Sends `request` on the stream (`make` builds the call from it, its id and its context), or hands it
    /// back for the unary call when the server does not know the stream: known already, or said by the
    /// first opening (until an opening succeeded, a copy of the request is kept for that). A server that no
    /// longer has the stream after it opened (replaced by an older version) fails the call `UNAVAILABLE`: it
    /// was not carried out, and the next call goes unary. A call the server itself answers `UNIMPLEMENTED`
    /// (a method it does not know) is answered so, as the unary call would be.
    pub(crate) async fn call_or_unary<M: Clone>(
        &self,
        timeout: Duration,
        request: M,
        make: impl FnOnce(M, u64, CallContext) -> C,
    ) -> Attempt<M, R::Reply> {
        if !self.supported() {
            return Attempt::Unary(request);
        }
        let fallback = (!self.known_supported()).then(|| request.clone());
        match self.call(timeout, move |id, context| make(request, id, context)).await {
            // The stream itself was refused (not one call): the flag is set before its calls are failed.
            Err(status) if status.code() == Code::Unimplemented && !self.supported() => match fallback {
                Some(request) => Attempt::Unary(request),
                None => Attempt::Answered(Err(Status::unavailable(format!(
                    "the server no longer has the {} stream; retry",
                    self.name
                )))),
            },
            outcome => Attempt::Answered(outcome),
        }
    }

    /// The open link, or a new one (whose stream opens in a task of its own) when there is none or it closed.
    fn link(&self) -> Link<C, R::Reply> {
        let mut current = lock(&self.link);
        if let Some(link) = current.as_ref()
            && !lock(&link.waiting).closed
        {
            return link.clone();
        }
        let (calls, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(Waiting { closed: false, calls: HashMap::new() }));
        let link = Link { calls, waiting: waiting.clone() };
        *current = Some(link.clone());
        let opening = (self.open)(UnboundedReceiverStream::new(receiver));
        tokio::spawn(answer_calls(self.name, opening, self.open_timeout, waiting, self.known.clone()));
        link
    }
}

/// Opens the stream and hands every result to the call waiting for it; when the stream fails or ends,
/// fails every call still waiting and closes the link.
async fn answer_calls<R: CallResult>(
    name: &'static str,
    opening: Opening<R>,
    open_timeout: Duration,
    waiting: Arc<Mutex<Waiting<R::Reply>>>,
    known: Arc<Known>,
) {
    let ended = match tokio::time::timeout(open_timeout, opening).await {
        Err(_) => Status::unavailable(format!("the {name} stream did not open within {open_timeout:?}")),
        Ok(Err(status)) => status,
        Ok(Ok(mut results)) => {
            known.supported.store(true, Ordering::Relaxed);
            loop {
                match results.message().await {
                    Ok(Some(result)) => {
                        let call = lock(&waiting).calls.remove(&result.id());
                        // A call that timed out is no longer waiting.
                        if let Some(call) = call {
                            let _ = call.send(result.into_outcome());
                        }
                    }
                    Ok(None) => break Status::unavailable(format!("the server ended the {name} stream; retry")),
                    Err(status) => break status,
                }
            }
        }
    };
    let status = if ended.code() == Code::Unimplemented {
        // A server replaced by an older version: from now on the unary call.
        known.supported.store(false, Ordering::Relaxed);
        known.unsupported.store(true, Ordering::Relaxed);
        ended
    } else {
        debug!(stream = name, status = %ended, "call stream closed");
        Status::unavailable(format!("the {name} stream failed: {}", ended.message()))
    };
    let calls = {
        let mut waiting = lock(&waiting);
        waiting.closed = true;
        std::mem::take(&mut waiting.calls)
    };
    for call in calls.into_values() {
        let _ = call.send(Err(status.clone()));
    }
}

/// Serves one call stream: reads its calls until the client ends its side or the server drains, runs
/// `serve` on each concurrently, and yields each result when it is ready. Ends after the last result of the
/// calls it read.
pub(crate) fn serve_call_stream<C, R, F, Fut>(
    mut calls: Streaming<C>,
    mut draining: Draining,
    serve: F,
) -> ReceiverStream<Result<R, Status>>
where
    C: Send + 'static,
    R: Send + 'static,
    F: Fn(C) -> Fut + Send + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let (results, stream) = mpsc::channel(RESULTS_BUFFER);
    let in_flight = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    tokio::spawn(async move {
        loop {
            let call = tokio::select! {
                biased;
                () = draining.wait() => break,
                call = async {
                    let permit = in_flight.clone().acquire_owned().await;
                    (permit, calls.message().await)
                } => call,
            };
            match call {
                (Ok(permit), Ok(Some(call))) => {
                    let result = serve(call);
                    let results = results.clone();
                    tokio::spawn(async move {
                        // The client went away: nobody is waiting.
                        let _ = results.send(Ok(result.await)).await;
                        drop(permit);
                    });
                }
                // The semaphore is never closed.
                (Err(_), _) => break,
                (_, Ok(None)) => break,
                (_, Err(status)) => {
                    debug!(%status, "call stream broke");
                    break;
                }
            }
        }
    });
    ReceiverStream::new(stream)
}

/// Runs one call of a call stream within the deadline its context gives (none when 0), as the server of a
/// unary call honours its `grpc-timeout`: a call nobody waits for any more does not hold the server.
pub(crate) async fn within_deadline<T>(
    context: &CallContext,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    if context.timeout_ms == 0 {
        return call.await;
    }
    let deadline = Duration::from_millis(u64::from(context.timeout_ms));
    match tokio::time::timeout(deadline, call).await {
        Ok(outcome) => outcome,
        Err(_) => {
            Err(Status::deadline_exceeded(format!("the call did not finish within its deadline of {deadline:?}")))
        }
    }
}

/// A failed call's status as it travels on a call stream: its code, message and Switchboard metadata.
pub(crate) fn call_error(status: &Status) -> CallError {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) if key.as_str().starts_with(METADATA_PREFIX) => {
                Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            _ => None,
        })
        .collect();
    CallError { code: i32::from(status.code()), message: status.message().to_owned(), metadata }
}

/// The status a [`CallError`] stands for (an entry that is not valid metadata is left out).
pub(crate) fn status_from_call_error(error: CallError) -> Status {
    let mut status = Status::new(Code::from_i32(error.code), error.message);
    for (key, value) in error.metadata {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            status.metadata_mut().insert(key, value);
        }
    }
    status
}

fn outcome<T>(id: u64, reply: Option<T>, error: Option<CallError>) -> Result<T, Status> {
    match (reply, error) {
        (_, Some(error)) => Err(status_from_call_error(error)),
        (Some(reply), None) => Ok(reply),
        (None, None) => Err(Status::internal(format!("the result of call {id} has neither a reply nor an error"))),
    }
}

impl CallResult for CommandResult {
    type Reply = CommandReply;

    fn id(&self) -> u64 {
        self.id
    }

    fn into_outcome(self) -> Result<CommandReply, Status> {
        outcome(self.id, self.reply, self.error)
    }
}

impl CallResult for AppendResult {
    type Reply = AppendResponse;

    fn id(&self) -> u64 {
        self.id
    }

    fn into_outcome(self) -> Result<AppendResponse, Status> {
        outcome(self.id, self.response, self.error)
    }
}

impl CallResult for RouterCallResult {
    type Reply = router_call_result::Reply;

    fn id(&self) -> u64 {
        self.id
    }

    fn into_outcome(self) -> Result<router_call_result::Reply, Status> {
        outcome(self.id, self.reply, self.error)
    }
}

/// The result the server sends for call `id`.
pub(crate) fn command_result(id: u64, outcome: Result<CommandReply, Status>) -> CommandResult {
    match outcome {
        Ok(reply) => CommandResult { id, reply: Some(reply), error: None },
        Err(status) => CommandResult { id, reply: None, error: Some(call_error(&status)) },
    }
}

pub(crate) fn router_call_result(id: u64, outcome: Result<router_call_result::Reply, Status>) -> RouterCallResult {
    match outcome {
        Ok(reply) => RouterCallResult { id, reply: Some(reply), error: None },
        Err(status) => RouterCallResult { id, reply: None, error: Some(call_error(&status)) },
    }
}

pub(crate) fn append_result(id: u64, outcome: Result<AppendResponse, Status>) -> AppendResult {
    match outcome {
        Ok(response) => AppendResult { id, response: Some(response), error: None },
        Err(status) => AppendResult { id, response: None, error: Some(call_error(&status)) },
    }
}

/// The call a client sends: `request` with the id and context [`CallStream::call`] gives it.
pub(crate) fn command_call(request: CommandRequest, id: u64, context: CallContext) -> CommandCall {
    CommandCall { id, context: Some(context), request: Some(request) }
}

pub(crate) fn router_call(request: router_call::Request, id: u64, context: CallContext) -> RouterCall {
    RouterCall { id, context: Some(context), request: Some(request) }
}

pub(crate) fn append_call(request: AppendRequest, id: u64, context: CallContext) -> AppendCall {
    AppendCall { id, context: Some(context), request: Some(request) }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A call stream whose every opening answers `status` (or never answers, for `None`), counting them.
    fn failing(status: Option<Status>) -> (CallStream<CommandCall, CommandResult>, Arc<AtomicUsize>) {
        let opened = Arc::new(AtomicUsize::new(0));
        let counter = opened.clone();
        let open: Open<CommandCall, CommandResult> = Arc::new(move |calls| {
            counter.fetch_add(1, Ordering::SeqCst);
            let status = status.clone();
            Box::pin(async move {
                let _calls = calls;
                match status {
                    Some(status) => Err(status),
                    None => std::future::pending().await,
                }
            })
        });
        (CallStream::new("Commands", Duration::from_secs(5), open), opened)
    }

    fn call() -> impl FnOnce(u64, CallContext) -> CommandCall {
        |id, context| command_call(CommandRequest::default(), id, context)
    }

    #[tokio::test]
    async fn a_server_without_the_stream_is_asked_once_and_then_left_to_unary_calls() {
        let (stream, opened) = failing(Some(Status::unimplemented("unknown method")));
        assert!(stream.supported());
        let first = stream.call(Duration::from_secs(1), call()).await.unwrap_err();
        assert_eq!(first.code(), Code::Unimplemented);
        assert!(!stream.supported());
        let second = stream.call(Duration::from_secs(1), call()).await.unwrap_err();
        assert_eq!(second.code(), Code::Unimplemented);
        assert_eq!(opened.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stream_that_fails_fails_its_calls_unavailable_and_the_next_call_opens_another() {
        let (stream, opened) = failing(Some(Status::unavailable("connection refused")));
        for expected_openings in 1..=2 {
            let error = stream.call(Duration::from_secs(1), call()).await.unwrap_err();
            assert_eq!(error.code(), Code::Unavailable);
            assert!(error.message().contains("connection refused"), "{error:?}");
            assert_eq!(opened.load(Ordering::SeqCst), expected_openings);
        }
        assert!(stream.supported());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_nobody_answers_times_out_and_is_forgotten() {
        let (stream, opened) = failing(None);
        let error = stream.call(Duration::from_millis(300), call()).await.unwrap_err();
        assert_eq!(error.code(), Code::DeadlineExceeded);
        let link = lock(&stream.link).clone().expect("the link");
        assert!(lock(&link.waiting).calls.is_empty());
        // The stream is still opening (it may yet open): the next call waits on the same one.
        let _ = stream.call(Duration::from_millis(300), call()).await;
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // An opening that takes longer than the request timeout gives up, and the next call opens again.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _ = stream.call(Duration::from_millis(300), call()).await;
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_status_crosses_the_stream_with_its_code_message_and_switchboard_metadata() {
        let mut status = Status::new(Code::ResourceExhausted, "license exhausted");
        status.metadata_mut().insert("x-switchboard-error", MetadataValue::from_static("refused"));
        status.metadata_mut().insert("x-switchboard-refusal", MetadataValue::from_static(r#"{"kind":"license"}"#));
        status.metadata_mut().insert("other", MetadataValue::from_static("dropped"));
        let error = call_error(&status);
        assert_eq!(error.code, i32::from(Code::ResourceExhausted));
        assert_eq!(error.metadata.len(), 2);
        let back = status_from_call_error(error);
        assert_eq!((back.code(), back.message()), (Code::ResourceExhausted, "license exhausted"));
        assert_eq!(back.metadata().get("x-switchboard-error").unwrap(), "refused");
        assert_eq!(back.metadata().get("x-switchboard-refusal").unwrap(), r#"{"kind":"license"}"#);
        assert!(back.metadata().get("other").is_none());
        // What is not valid metadata is left out rather than failing the call.
        let odd = CallError {
            code: 99,
            message: "m".into(),
            metadata: [("bad key".to_owned(), "v".to_owned()), ("x-switchboard-error".to_owned(), "a\nb".to_owned())]
                .into(),
        };
        let back = status_from_call_error(odd);
        assert_eq!(back.code(), Code::Unknown);
        assert!(back.metadata().is_empty());
        // A result with neither part is an internal error, not a panic.
        let empty = CommandResult { id: 4, reply: None, error: None };
        assert_eq!(empty.into_outcome().unwrap_err().code(), Code::Internal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_served_call_gives_up_at_the_deadline_its_caller_sent() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Status>(())
        };
        let context = CallContext { timeout_ms: 300, ..CallContext::default() };
        let started = tokio::time::Instant::now();
        assert_eq!(within_deadline(&context, slow).await.unwrap_err().code(), Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        let unbounded = CallContext::default();
        let slow = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, Status>(7)
        };
        assert_eq!(within_deadline(&unbounded, slow).await.unwrap(), 7);
    }
}
