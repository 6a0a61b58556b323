//! Pushes written while a request waits for the router, over real WebSockets: a gateway over a wrapper of the
//! in-process router that holds one chosen call until the test releases it.
//!
//! A `message.send` (like `message.delivered` and `typing`) changes nothing of the connection, so while it
//! waits for the router the connection goes on writing the pushes queued for it: an agent whose own message is
//! slow to store still sees the customer's messages meanwhile, rather than a socket's deliveries waiting for
//! its own requests. A request that changes the connection (here `chat.accept`, which subscribes it) still
//! holds every push until it is answered, so that its answer comes before the events it makes the connection
//! follow.
//!
//! A `chat.unsubscribe` ends the pushes of a chat to that connection at once, and the gateway's subscription
//! with its last connection following the chat (the wrapper records the gateway's unsubscriptions); so does
//! the first event of a chat no connection follows (a subscription whose answer was lost).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use common::{ALICE, DEADLINE, Server, WIDGET, WsClient};
use serde_json::{Value, json};
use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use switchboard_proto::router::{
    AgentView, Caller, ChatCommand, ChatList, ChatView, CommandOutcome, EventPage, GatewayId, OfflineMessage, Push,
    RouterApi, RouterError, ShownOffer, StartChat, StartedChat, Ticket,
};
use switchboard_router::Router;
use tokio::sync::{Notify, mpsc};

/// The body of the agent's message that the wrapper holds.
const HELD_BODY: &str = "hold me";
/// The id of the request the wrapper holds (the `WsClient` numbers its own `w1`, `w2`...).
const HELD_ID: &str = "held";

/// One held call: `arrived` is told when the call reaches the wrapper, which passes it on once `release` is.
/// Both keep a permit, so neither side can miss the other.
#[derive(Default)]
struct Hold {
    arrived: Notify,
    release: Notify,
}

impl Hold {
    async fn wait_for_release(&self) {
        self.arrived.notify_one();
        self.release.notified().await;
    }

    /// Resolves once a call is held; fails the test rather than hang when none comes.
    async fn arrived(&self, what: &str) {
        tokio::time::timeout(DEADLINE, self.arrived.notified())
            .await
            .unwrap_or_else(|_| panic!("{what} did not reach the router within {DEADLINE:?}"));
    }
}

/// What the test holds: a `message.send` with [`HELD_BODY`], the next `chat.accept` once asked, and the next
/// subscription once asked (which then fails, `unavailable`).
#[derive(Default)]
struct Holds {
    message: Hold,
    accept: Hold,
    hold_next_accept: AtomicBool,
    subscribe: Hold,
    fail_next_subscribe: AtomicBool,
    /// The next subscription is made, and its answer lost on the way back (`unavailable`).
    lose_next_subscribe_answer: AtomicBool,
    /// Every conversation the gateway unsubscribed from, in order (nothing is held), and a permit each time.
    unsubscribed: Mutex<Vec<ConversationId>>,
    unsubscribing: Notify,
}

/// The router as the gateway sees it: the real one, but for the calls [`Holds`] holds.
struct Holding {
    inner: Arc<Router>,
    holds: Arc<Holds>,
}

#[async_trait]
impl RouterApi for Holding {
    fn connect_gateway(&self, gateway: GatewayId, sink: mpsc::UnboundedSender<Push>) {
        self.inner.connect_gateway(gateway, sink);
    }

    async fn start_chat(&self, request: StartChat) -> Result<StartedChat, RouterError> {
        self.inner.start_chat(request).await
    }

    async fn authorize_customer(&self, conversation: ConversationId, token: &str) -> Result<ChatView, RouterError> {
        self.inner.authorize_customer(conversation, token).await
    }

    async fn chat_view(&self, caller: &Caller, conversation: ConversationId) -> Result<ChatView, RouterError> {
        self.inner.chat_view(caller, conversation).await
    }

    async fn subscribe(
        &self,
        gateway: &GatewayId,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        if self.holds.fail_next_subscribe.swap(false, Ordering::SeqCst) {
            self.holds.subscribe.wait_for_release().await;
            return Err(RouterError::Unavailable("a shard on its way to another router".into()));
        }
        let subscribed = self.inner.subscribe(gateway, caller, conversation, after_seq).await;
        if self.holds.lose_next_subscribe_answer.swap(false, Ordering::SeqCst) {
            return Err(RouterError::Unavailable("the answer was lost on its way back".into()));
        }
        subscribed
    }

    async fn unsubscribe(&self, gateway: &GatewayId, conversation: ConversationId) {
        self.holds.unsubscribed.lock().unwrap().push(conversation);
        self.holds.unsubscribing.notify_one();
        self.inner.unsubscribe(gateway, conversation).await
    }

    async fn read_events(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        after_seq: u64,
    ) -> Result<EventPage, RouterError> {
        self.inner.read_events(caller, conversation, after_seq).await
    }

    async fn command(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        command: ChatCommand,
    ) -> Result<CommandOutcome, RouterError> {
        if matches!(&command, ChatCommand::Send { body, .. } if body == HELD_BODY) {
            self.holds.message.wait_for_release().await;
        }
        self.inner.command(caller, conversation, command).await
    }

    async fn typing(&self, caller: &Caller, conversation: ConversationId, typing: bool) -> Result<(), RouterError> {
        self.inner.typing(caller, conversation, typing).await
    }

    async fn customer_connection(&self, conversation: ConversationId) -> Result<(), RouterError> {
        self.inner.customer_connection(conversation).await
    }

    async fn accept_chat(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<ChatView, RouterError> {
        if self.holds.hold_next_accept.swap(false, Ordering::SeqCst) {
            self.holds.accept.wait_for_release().await;
        }
        self.inner.accept_chat(tenant, agent, conversation).await
    }

    async fn set_agent_status(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        status: AgentStatus,
    ) -> Result<AgentView, RouterError> {
        self.inner.set_agent_status(tenant, agent, status).await
    }

    async fn subscribe_queue(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        group: &GroupId,
    ) -> Result<(), RouterError> {
        self.inner.subscribe_queue(gateway, tenant, group).await
    }

    async fn unsubscribe_queue(&self, gateway: &GatewayId, tenant: &TenantId, group: &GroupId) {
        self.inner.unsubscribe_queue(gateway, tenant, group).await
    }

    async fn list_chats(
        &self,
        tenant: &TenantId,
        agent: &AgentId,
        list: ChatList,
    ) -> Result<Vec<ChatView>, RouterError> {
        self.inner.list_chats(tenant, agent, list).await
    }

    async fn subscribe_agent(
        &self,
        gateway: &GatewayId,
        tenant: &TenantId,
        agent: &AgentId,
        shown: &[ShownOffer],
    ) -> Result<(), RouterError> {
        self.inner.subscribe_agent(gateway, tenant, agent, shown).await
    }

    async fn unsubscribe_agent(&self, gateway: &GatewayId, tenant: &TenantId, agent: &AgentId) {
        self.inner.unsubscribe_agent(gateway, tenant, agent).await
    }

    async fn reject_offer(
        &self,
        tenant: &TenantId,
        group: &GroupId,
        agent: &AgentId,
        conversation: ConversationId,
    ) -> Result<(), RouterError> {
        self.inner.reject_offer(tenant, group, agent, conversation).await
    }

    async fn transfer_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_group: &GroupId,
    ) -> Result<ChatView, RouterError> {
        self.inner.transfer_chat(caller, conversation, to_group).await
    }

    async fn forward_chat(
        &self,
        caller: &Caller,
        conversation: ConversationId,
        to_agent: &AgentId,
    ) -> Result<ChatView, RouterError> {
        self.inner.forward_chat(caller, conversation, to_agent).await
    }

    async fn leave_offline_message(&self, message: OfflineMessage) -> Result<Ticket, RouterError> {
        self.inner.leave_offline_message(message).await
    }
}

/// A server whose gateway asks the router through [`Holding`], and what the test holds with.
async fn start() -> (Server, Arc<Holds>) {
    let holds = Arc::new(Holds::default());
    let wrapper_holds = holds.clone();
    let server = Server::start_wrapped(move |inner| Arc::new(Holding { inner, holds: wrapper_holds })).await;
    (server, holds)
}

/// A customer's chat in `sales`; answers the connection and the conversation id.
async fn customer(server: &Server, name: &str) -> (WsClient, String) {
    let mut client = WsClient::connect(server).await;
    let started = client
        .ack(json!({ "type": "chat.start", "widget_key": WIDGET, "group": "sales", "name": name, "question": "Hi?" }))
        .await;
    let conversation = started["conversation"].as_str().unwrap().to_owned();
    client.expect_events(&conversation, &[(1, "created"), (2, "message")]).await;
    (client, conversation)
}

/// Alice, signed in, with `chat` accepted and its events read.
async fn alice_with(server: &Server, chat: &str) -> WsClient {
    let mut alice = WsClient::connect(server).await;
    let signed = alice.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    assert_eq!(signed["agent"]["status"], "online");
    let accepted = alice.ack(json!({ "type": "chat.accept", "conversation": chat })).await;
    assert_eq!(accepted["chat"]["owner"], "alice");
    alice.expect_events(chat, &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    alice
}

/// Sends `request` with id [`HELD_ID`], without waiting for its answer.
async fn send_held(client: &mut WsClient, mut request: Value) {
    request["id"] = json!(HELD_ID);
    client.send_text(request.to_string()).await;
}

/// The customer's message: the seq its ack gives.
async fn customer_says(customer: &mut WsClient, chat: &str, body: &str) -> u64 {
    let sent = customer
        .ack(json!({ "type": "message.send", "conversation": chat, "client_msg_id": "d-1", "body": body }))
        .await;
    assert_eq!(sent["status"], "sent", "{sent}");
    sent["seq"].as_u64().expect("a stored message has a seq")
}

#[tokio::test]
async fn an_agent_sees_the_customers_message_while_its_own_waits_for_the_router() {
    let (server, holds) = start().await;
    let (mut dana, chat) = customer(&server, "Dana").await;
    let mut alice = alice_with(&server, &chat).await;
    dana.expect_events(&chat, &[(3, "accepted")]).await;

    // Alice's message waits for the router...
    let message = json!({ "type": "message.send", "conversation": chat, "client_msg_id": "a-1", "body": HELD_BODY });
    send_held(&mut alice, message).await;
    holds.message.arrived("alice's message").await;
    // ... while Dana writes.
    let dana_seq = customer_says(&mut dana, &chat, "Is anyone there?").await;

    // Alice reads Dana's message before her own is answered. The guard is shorter than a read's own deadline,
    // so that a connection that holds the push fails here, with this message.
    let guard = DEADLINE / 2;
    let pushed = tokio::time::timeout(guard, async {
        loop {
            let frame = alice.read().await.expect("alice's connection is open");
            assert!(
                frame["type"] != "ack" && frame["type"] != "error",
                "the held request was answered before Dana's message was pushed: {frame}"
            );
            if frame["type"] == "event" && frame["event"]["seq"].as_u64() == Some(dana_seq) {
                return frame;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("Dana's message was not pushed to Alice within {guard:?} while her own was held"));
    assert_eq!(pushed["conversation"], chat.as_str(), "{pushed}");
    assert_eq!(
        (
            pushed["event"]["kind"].as_str(),
            pushed["event"]["body"].as_str(),
            pushed["event"]["author"]["role"].as_str()
        ),
        (Some("message"), Some("Is anyone there?"), Some("customer")),
        "{pushed}"
    );

    // Released, Alice's message is stored after Dana's, and Dana reads both in order.
    holds.message.release.notify_one();
    let answer = alice.answer(Some(HELD_ID)).await;
    assert_eq!((answer["type"].as_str(), answer["status"].as_str()), (Some("ack"), Some("sent")), "{answer}");
    let alice_seq = answer["seq"].as_u64().expect("a stored message has a seq");
    assert!(alice_seq > dana_seq, "alice's message at {alice_seq}, after Dana's at {dana_seq}");
    dana.expect_events(&chat, &[(dana_seq, "message")]).await;
    let reply = dana.push_of("event").await;
    assert_eq!(
        (reply["event"]["seq"].as_u64(), reply["event"]["kind"].as_str(), reply["event"]["body"].as_str()),
        (Some(alice_seq), Some("message"), Some(HELD_BODY)),
        "{reply}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_changes_the_connection_still_holds_the_pushes_until_answered() {
    let (server, holds) = start().await;
    let (mut dana, chat) = customer(&server, "Dana").await;
    let mut alice = alice_with(&server, &chat).await;
    dana.expect_events(&chat, &[(3, "accepted")]).await;
    let (_erin, second) = customer(&server, "Erin").await;

    // Alice's accept of Erin's chat waits for the router...
    holds.hold_next_accept.store(true, Ordering::SeqCst);
    send_held(&mut alice, json!({ "type": "chat.accept", "conversation": second })).await;
    holds.accept.arrived("alice's accept").await;
    // ... while Dana writes. Dana reading her message means the gateway has queued it for every connection
    // following the chat, Alice's included.
    let dana_seq = customer_says(&mut dana, &chat, "Is anyone there?").await;
    dana.expect_events(&chat, &[(dana_seq, "message")]).await;

    // Released, the accept is answered before Dana's message is written to Alice; then Erin's chat, then
    // Dana's message.
    holds.accept.release.notify_one();
    let answer = tokio::time::timeout(DEADLINE, async {
        loop {
            let frame = alice.read().await.expect("alice's connection is open");
            assert!(
                frame["type"] != "event" || frame["conversation"] != chat.as_str(),
                "Dana's message was pushed while the accept waited: {frame}"
            );
            if frame["type"] == "ack" || frame["type"] == "error" {
                return frame;
            }
        }
    })
    .await
    .expect("the accept is answered");
    assert_eq!((answer["type"].as_str(), answer["id"].as_str()), (Some("ack"), Some(HELD_ID)), "{answer}");
    assert_eq!(answer["chat"]["owner"], "alice", "{answer}");
    alice.expect_events(&second, &[(1, "created"), (2, "message"), (3, "accepted")]).await;
    alice.expect_events(&chat, &[(dana_seq, "message")]).await;
    server.stop().await;
}

/// A subscription that fails leaves the connection without the chat's events, those pushed while it was on
/// its way included: the gateway watched the chat for this connection first (so that nothing is missed
/// between the subscription and its first events), and the events the watch queued are not written.
#[tokio::test]
async fn a_subscription_that_fails_writes_none_of_the_events_pushed_while_it_was_on_its_way() {
    let (server, holds) = start().await;
    let (mut dana, chat) = customer(&server, "Dana").await;
    let mut alice = WsClient::connect(&server).await;
    alice.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;

    holds.fail_next_subscribe.store(true, Ordering::SeqCst);
    send_held(&mut alice, json!({ "type": "chat.subscribe", "conversation": chat })).await;
    holds.subscribe.arrived("alice's subscription").await;
    // Dana's message reaches the gateway (her connection follows the chat) while Alice's subscription waits.
    let seq = customer_says(&mut dana, &chat, "Anyone?").await;
    dana.expect_events(&chat, &[(seq, "message")]).await;
    holds.subscribe.release.notify_one();
    let answer = alice.answer(Some(HELD_ID)).await;
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some("unavailable")), "{answer}");

    // Nothing of the chat follows: the next frame Alice gets is the answer to her next request.
    let listed = alice.call(json!({ "type": "queue.list" })).await;
    assert_eq!(listed["type"], "ack", "{listed}");
    while let Some(push) = alice.take_push() {
        assert_ne!(push["type"], "event", "an event of a chat Alice does not follow: {push}");
    }
    server.stop().await;
}

/// After `chat.unsubscribe` no event of the chat reaches the connection, while the others following it get
/// them; the gateway stays subscribed until the last of its connections following the chat unsubscribes
/// (a closed chat then leaves the router's memory). Following it again replays what was missed meanwhile.
#[tokio::test]
async fn an_unsubscribed_connection_gets_no_more_events_and_the_last_one_unsubscribes_the_gateway() {
    let (server, holds) = start().await;
    let (mut dana, chat) = customer(&server, "Dana").await;
    let mut alice = alice_with(&server, &chat).await;
    dana.expect_events(&chat, &[(3, "accepted")]).await;
    let mut console = WsClient::connect(&server).await;
    console.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    console.ack(json!({ "type": "chat.subscribe", "conversation": chat, "after_seq": 3 })).await;
    let unsubscribe = json!({ "type": "chat.unsubscribe", "conversation": chat });

    let stopped = alice.ack(unsubscribe.clone()).await;
    assert_eq!(stopped["followed"], true, "{stopped}");
    let again = alice.ack(unsubscribe.clone()).await;
    assert_eq!(again["followed"], false, "{again}");
    let seq = customer_says(&mut dana, &chat, "Still there?").await;
    // The console got Dana's message: the gateway dispatched it to every connection following the chat at
    // once, so a connection still following it would have had it queued by now, and written it before the
    // answer to its second request at the latest.
    console.expect_events(&chat, &[(seq, "message")]).await;
    for _ in 0..2 {
        alice.ack(json!({ "type": "ping" })).await;
    }
    while let Some(push) = alice.take_push() {
        assert_ne!(push["type"], "event", "an event of a chat Alice no longer follows: {push}");
    }
    assert!(holds.unsubscribed.lock().unwrap().is_empty(), "the console and Dana still follow the chat");

    // The other connections stop following it; the gateway unsubscribes with the last one.
    assert_eq!(console.ack(unsubscribe.clone()).await["followed"], true);
    assert!(holds.unsubscribed.lock().unwrap().is_empty(), "Dana still follows the chat");
    // A customer's connection follows its chat as long as it is open: the gateway unsubscribes when it ends.
    assert_eq!(dana.call(unsubscribe.clone()).await["code"], "forbidden");
    drop(dana);
    tokio::time::timeout(DEADLINE, holds.unsubscribing.notified()).await.expect("the gateway unsubscribes");
    let unsubscribed: Vec<String> = holds.unsubscribed.lock().unwrap().iter().map(ToString::to_string).collect();
    assert_eq!(unsubscribed, [chat.as_str()]);

    // Alice follows the chat again from the last event she had: Dana's message is replayed, then live ones.
    alice.ack(json!({ "type": "chat.subscribe", "conversation": chat, "after_seq": 3 })).await;
    alice.expect_events(&chat, &[(seq, "message")]).await;
    let reply =
        alice.ack(json!({ "type": "message.send", "conversation": chat, "client_msg_id": "a-2", "body": "Yes" })).await;
    alice.expect_events(&chat, &[(reply["seq"].as_u64().unwrap(), "message")]).await;
    server.stop().await;
}

/// A subscription the router made but whose answer the gateway never got (lost on its way back): the gateway
/// takes itself for not subscribed, while the router goes on pushing the chat's events to it. The first of
/// them, which no connection of the gateway follows, makes it unsubscribe.
#[tokio::test]
async fn a_subscription_whose_answer_was_lost_is_undone_at_the_chats_next_event() {
    let (server, holds) = start().await;
    let (dana, chat) = customer(&server, "Dana").await;
    let conversation = ConversationId::parse(&chat).unwrap();
    // Dana leaves: her connection was the last one following the chat here.
    drop(dana);
    let left = tokio::time::timeout(DEADLINE, async {
        while !holds.unsubscribed.lock().unwrap().contains(&conversation) {
            holds.unsubscribing.notified().await;
        }
    });
    left.await.expect("the gateway unsubscribed once Dana left");
    holds.unsubscribed.lock().unwrap().clear();

    let mut alice = WsClient::connect(&server).await;
    alice.ack(json!({ "type": "agent.sign_in", "token": ALICE })).await;
    holds.lose_next_subscribe_answer.store(true, Ordering::SeqCst);
    let answer = alice.call(json!({ "type": "chat.subscribe", "conversation": chat })).await;
    assert_eq!(answer["code"], "unavailable", "{answer}");
    assert!(holds.unsubscribed.lock().unwrap().is_empty(), "the gateway did not know it was subscribed");

    // An event of the chat made without the gateway (Dana's message through the router itself).
    let send = ChatCommand::Send { client_msg_id: "m1".into(), body: "still there?".into() };
    server.router.command(&Caller::Customer { conversation }, conversation, send).await.unwrap();
    let undone = tokio::time::timeout(DEADLINE, async {
        while holds.unsubscribed.lock().unwrap().is_empty() {
            holds.unsubscribing.notified().await;
        }
    });
    undone.await.expect("the gateway unsubscribed at the chat's next event");
    assert_eq!(*holds.unsubscribed.lock().unwrap(), [conversation]);
    assert!(alice.take_push().is_none_or(|push| push["type"] != "event"));
    server.stop().await;
}
