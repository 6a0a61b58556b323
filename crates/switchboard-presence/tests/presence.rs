//! The behaviour of [`Presence`], run against [`MemoryPresence`] and against [`RedisPresence`] on a real
//! `redis-server` started for each test.

use std::time::Duration;

use switchboard_domain::{AgentId, AgentStatus, ConversationId, GroupId, TenantId};
use switchboard_presence::{
    Connections, CustomerSession, GroupStatus, KEPT_CONNECTIONS, LicenseMirror, LiveSession, MemoryPresence, Presence,
    PresenceChange, PresenceError, RedisPresence, RedisSettings, StartBudget,
};
use switchboard_testservices::Redis;
use tokio::sync::broadcast;

/// How long a published change may take to arrive before the test fails.
const DELIVERY: Duration = Duration::from_secs(5);

fn tenant(id: &str) -> TenantId {
    TenantId::new(id).expect("valid id")
}

fn agent(id: &str) -> AgentId {
    AgentId::new(id).expect("valid id")
}

fn group(id: &str) -> GroupId {
    GroupId::new(id).expect("valid id")
}

/// The next change other than `Resync`, or a failure after [`DELIVERY`].
async fn next_change(changes: &mut broadcast::Receiver<PresenceChange>) -> PresenceChange {
    loop {
        match tokio::time::timeout(DELIVERY, changes.recv()).await {
            Ok(Ok(PresenceChange::Resync)) => continue,
            Ok(Ok(change)) => return change,
            Ok(Err(error)) => panic!("change stream failed: {error}"),
            Err(_) => panic!("no change within {DELIVERY:?}"),
        }
    }
}

/// Publishes a marker (a new session of agent `marker`) and checks that it is the next change: nothing was
/// published in between.
async fn assert_nothing_published(p: &dyn Presence, changes: &mut broadcast::Receiver<PresenceChange>, marker: &str) {
    p.session_alive(&tenant("mark"), &agent(marker), "marker", "gw", i64::MAX / 2).await.expect("marker");
    assert_eq!(
        next_change(changes).await,
        PresenceChange::Session { tenant: tenant("mark"), agent: agent(marker), up: true },
        "something was published before the marker {marker}"
    );
}

async fn expiry_is_by_value(p: &dyn Presence) {
    use Connections::{Here, Unknown};
    let (t, a) = (tenant("acme"), agent("ann"));
    p.session_alive(&t, &a, "s1", "gw1", 1_000).await.expect("alive");
    let ask = [(t.clone(), a.clone())];
    let gone = |since_ms| Connections::Gone { since_ms };
    assert_eq!(p.agents_present(&ask, 999).await.expect("read"), [Here]);
    // Expired at exactly its expiry instant, and gone since then.
    assert_eq!(p.agents_present(&ask, 1_000).await.expect("read"), [gone(1_000)]);
    // A refresh moves the expiry.
    p.session_alive(&t, &a, "s1", "gw1", 2_000).await.expect("refresh");
    assert_eq!(p.agents_present(&ask, 1_500).await.expect("read"), [Here]);
    assert_eq!(p.agents_present(&ask, 2_500).await.expect("read"), [gone(2_000)]);
    // Agents never recorded are unknown; the answer follows the order asked.
    let ask = [(t.clone(), agent("nobody")), (t.clone(), a.clone()), (tenant("other"), a.clone())];
    assert_eq!(p.agents_present(&ask, 1_500).await.expect("read"), [Unknown, Here, Unknown]);
    assert_eq!(p.agents_present(&[], 1_500).await.expect("read"), Vec::<Connections>::new());
    // A refresh with an earlier expiry is taken as it is (the writer's clock decides).
    p.session_alive(&t, &a, "s1", "gw1", 1_200).await.expect("refresh");
    assert_eq!(p.agents_present(&[(t, a)], 1_500).await.expect("read"), [gone(1_200)]);
}

fn chat_id(n: u64) -> ConversationId {
    ConversationId::parse(&format!("00000000-0000-7000-8000-{n:012x}")).expect("valid id")
}

fn customer(tenant_id: &str, chat: u64, session: &str) -> CustomerSession {
    CustomerSession { tenant: tenant(tenant_id), conversation: chat_id(chat), session: session.into() }
}

async fn a_chats_customer_is_here_gone_or_unknown(p: &dyn Presence) {
    use Connections::{Here, Unknown};
    let gone = |since_ms| Connections::Gone { since_ms };
    let (c1, c2, c3) = (chat_id(1), chat_id(2), chat_id(3));
    let t = tenant("acme");
    // Chat 1 has two connections (a second tab), chat 2 one; chat 3 none ever.
    let (tab1, tab2, other) =
        (customer("acme", 1, "gw/b/1"), customer("acme", 1, "gw/b/2"), customer("acme", 2, "gw/b/3"));
    p.customers_alive(&[tab1.clone(), tab2.clone(), other.clone()], 1_000).await.expect("alive");
    assert_eq!(p.customers_present(&t, &[c1, c2, c3], 500).await.expect("read"), [Here, Here, Unknown]);
    // Expired by value at its expiry instant, gone since then; written again, here again.
    assert_eq!(p.customers_present(&t, &[c1, c2], 1_000).await.expect("read"), [gone(1_000), gone(1_000)]);
    p.customers_alive(&[tab1.clone(), tab2.clone(), other.clone()], 2_000).await.expect("refresh");
    // One tab closes: the other keeps the customer here; the last one closes: gone before its expiry.
    p.customer_gone(&tab1, 1_100).await.expect("gone");
    assert_eq!(p.customers_present(&t, &[c1], 1_200).await.expect("read"), [Here]);
    p.customer_gone(&tab2, 1_300).await.expect("gone");
    p.customer_gone(&other, 1_250).await.expect("gone");
    assert_eq!(p.customers_present(&t, &[c1, c2], 1_400).await.expect("read"), [gone(1_300), gone(1_250)]);
    // Gone since the last of their connections ended, the first tab's end being earlier.
    // An end written again later (a gateway's retry) does not move it: only ever earlier.
    p.customer_gone(&tab2, 1_350).await.expect("gone again");
    assert_eq!(p.customers_present(&t, &[c1], 1_400).await.expect("read"), [gone(1_300)]);
    // A connection never written is not made up by its end; another tenant's chat is another chat.
    p.customer_gone(&customer("acme", 3, "gw/b/4"), 1_400).await.expect("gone");
    assert_eq!(p.customers_present(&t, &[c3], 1_500).await.expect("read"), [Unknown]);
    assert_eq!(p.customers_present(&tenant("other"), &[c1], 1_500).await.expect("read"), [Unknown]);
    // A customer who comes back (a reload) is here again.
    p.customers_alive(&[customer("acme", 1, "gw/b/5")], 3_000).await.expect("back");
    assert_eq!(p.customers_present(&t, &[c2, c1], 2_000).await.expect("read"), [gone(1_250), Here]);
    assert_eq!(p.customers_present(&t, &[], 2_000).await.expect("read"), Vec::<Connections>::new());
    // Many at once (more than one pipeline's worth), in the order asked.
    let many: Vec<CustomerSession> = (100..1_300).map(|chat| customer("acme", chat, &format!("s{chat}"))).collect();
    p.customers_alive(&many, 5_000).await.expect("many");
    let asked: Vec<ConversationId> = (99..1_301).map(chat_id).collect();
    let read = p.customers_present(&t, &asked, 4_000).await.expect("read many");
    assert_eq!(read.len(), asked.len());
    assert_eq!((read[0], read[1], read[1_200], read[1_201]), (Unknown, Here, Here, Unknown));
}

async fn an_agent_may_have_several_sessions(p: &dyn Presence) {
    use Connections::Here;
    let (t, a) = (tenant("acme"), agent("ann"));
    p.session_alive(&t, &a, "s1", "gw1", 1_000).await.expect("alive");
    p.session_alive(&t, &a, "s2", "gw2", 2_000).await.expect("alive");
    p.session_alive(&t, &agent("bob"), "s3", "gw1", 2_000).await.expect("alive");
    let ask = [(t.clone(), a.clone())];
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Here]);
    assert_eq!(p.agents_present(&ask, 1_500).await.expect("read"), [Here], "s2 still");
    assert_eq!(
        p.agent_sessions(&t, &a, 500).await.expect("read"),
        [
            LiveSession { session: "s1".into(), gateway: "gw1".into(), expires_at_ms: 1_000 },
            LiveSession { session: "s2".into(), gateway: "gw2".into(), expires_at_ms: 2_000 },
        ]
    );
    assert_eq!(
        p.agent_sessions(&t, &a, 1_500).await.expect("read"),
        [LiveSession { session: "s2".into(), gateway: "gw2".into(), expires_at_ms: 2_000 }]
    );
    p.session_gone(&t, &a, "s2", 400).await.expect("gone");
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Here], "s1 still");
    // Closing an unknown session is harmless, and adds nothing.
    p.session_gone(&t, &a, "never-was", 450).await.expect("gone");
    p.session_gone(&t, &a, "s1", 300).await.expect("gone");
    // Gone since the last of them ended (s2, the later end); an end written again later does not move it.
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Connections::Gone { since_ms: 400 }]);
    p.session_gone(&t, &a, "s2", 480).await.expect("gone again");
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Connections::Gone { since_ms: 400 }]);
    assert_eq!(p.agent_sessions(&t, &a, 500).await.expect("read"), []);
    assert_eq!(p.agents_present(&[(t.clone(), agent("bob"))], 500).await.expect("read"), [Here]);
    // A new connection: here again.
    p.session_alive(&t, &a, "s4", "gw1", 3_000).await.expect("alive");
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Here]);
}

/// Those who reconnect all day: [`KEPT_CONNECTIONS`] connections are kept and older ended ones go, which
/// changes no reading (the connection that lasts longest is never dropped). Run by the suite; what is kept is
/// counted where it is stored (`ended_connections_beyond_the_kept_are_dropped_in_redis`).
async fn many_ended_connections_read_as_the_last(p: &dyn Presence) {
    let (t, a) = (tenant("acme"), agent("cy"));
    let ask = [(t.clone(), a.clone())];
    let many = KEPT_CONNECTIONS + 36;
    p.session_alive(&t, &a, "open-tab", "gw1", 1_000_000).await.expect("alive");
    for i in 0..many {
        let session = format!("s{i}");
        p.session_alive(&t, &a, &session, "gw1", 10_000 + i).await.expect("alive");
        p.session_gone(&t, &a, &session, 100 + i).await.expect("gone");
    }
    assert_eq!(p.agents_present(&ask, 500).await.expect("read"), [Connections::Here], "the open tab");
    let open = LiveSession { session: "open-tab".into(), gateway: "gw1".into(), expires_at_ms: 1_000_000 };
    assert_eq!(p.agent_sessions(&t, &a, 500).await.expect("read"), [open]);
    p.session_gone(&t, &a, "open-tab", 700).await.expect("gone");
    assert_eq!(p.agents_present(&ask, 800).await.expect("read"), [Connections::Gone { since_ms: 700 }]);
    // A chat's customer alike.
    for i in 0..many {
        let connection = customer("acme", 9, &format!("gw/c/{i}"));
        p.customers_alive(std::slice::from_ref(&connection), 10_000 + i).await.expect("alive");
        p.customer_gone(&connection, 100 + i).await.expect("gone");
    }
    let since_ms = 100 + many - 1;
    assert_eq!(p.customers_present(&t, &[chat_id(9)], 800).await.expect("read"), [Connections::Gone { since_ms }]);
}

#[tokio::test]
async fn ended_connections_beyond_the_kept_are_dropped_in_redis() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    many_ended_connections_read_as_the_last(&presence).await;
    let client = ::redis::Client::open(server.url()).expect("url");
    let mut raw = client.get_multiplexed_async_connection().await.expect("raw connection");
    for key in ["sb:session:acme:cy".to_owned(), format!("sb:customer:acme:{}", chat_id(9))] {
        let kept: i64 = ::redis::cmd("ZCARD").arg(&key).query_async(&mut raw).await.expect("zcard");
        assert_eq!(kept, KEPT_CONNECTIONS, "{key}");
    }
}

async fn signed_in_agents_are_counted_per_group(p: &dyn Presence) {
    let t = tenant("acme");
    let (sales, support) = (group("sales"), group("support"));
    p.signed_in(&t, &agent("ann"), AgentStatus::Online, &[sales.clone(), support.clone()], 1_000)
        .await
        .expect("sign in");
    p.signed_in(&t, &agent("bob"), AgentStatus::Online, std::slice::from_ref(&sales), 2_000).await.expect("sign in");
    p.signed_in(&tenant("other"), &agent("ann"), AgentStatus::Online, std::slice::from_ref(&sales), 2_000)
        .await
        .expect("sign in");
    p.signed_in(&t, &agent("carl"), AgentStatus::Online, &[], 2_000).await.expect("no group");
    assert_eq!(p.n_signed_in(&t, &sales, 500).await.expect("read"), 2);
    assert_eq!(p.n_signed_in(&t, &support, 500).await.expect("read"), 1);
    assert_eq!(p.n_signed_in(&t, &sales, 1_500).await.expect("read"), 1);
    assert_eq!(p.n_signed_in(&t, &support, 1_000).await.expect("read"), 0);
    assert_eq!(p.n_signed_in(&t, &group("nobody-here"), 500).await.expect("read"), 0);
    // A refresh extends; signing out removes from the groups named only.
    p.signed_in(&t, &agent("ann"), AgentStatus::Online, &[sales.clone(), support.clone()], 3_000)
        .await
        .expect("refresh");
    assert_eq!(p.n_signed_in(&t, &sales, 2_500).await.expect("read"), 1);
    p.signed_out(&t, &agent("ann"), std::slice::from_ref(&sales)).await.expect("sign out");
    assert_eq!(p.n_signed_in(&t, &sales, 500).await.expect("read"), 1);
    assert_eq!(p.n_signed_in(&t, &support, 500).await.expect("read"), 1);
    p.signed_out(&t, &agent("ann"), &[sales.clone(), support.clone()]).await.expect("sign out again");
    assert_eq!(p.n_signed_in(&t, &support, 500).await.expect("read"), 0);
    assert_eq!(p.n_signed_in(&tenant("other"), &sales, 500).await.expect("read"), 1);
}

async fn the_chosen_status_is_kept_until_sign_out(p: &dyn Presence) {
    let (t, ann, sales) = (tenant("acme"), agent("ann"), group("sales"));
    assert_eq!(p.chosen_status(&t, &ann).await.expect("read"), None);
    p.signed_in(&t, &ann, AgentStatus::Online, std::slice::from_ref(&sales), 1_000).await.expect("sign in");
    assert_eq!(p.chosen_status(&t, &ann).await.expect("read"), Some(AgentStatus::Online));
    p.signed_in(&t, &ann, AgentStatus::Away, std::slice::from_ref(&sales), 2_000).await.expect("away");
    assert_eq!(p.chosen_status(&t, &ann).await.expect("read"), Some(AgentStatus::Away));
    // Per tenant and agent; an agent in no group has one too.
    assert_eq!(p.chosen_status(&tenant("other"), &ann).await.expect("read"), None);
    p.signed_in(&t, &agent("bob"), AgentStatus::Online, &[], 2_000).await.expect("no group");
    assert_eq!(p.chosen_status(&t, &agent("bob")).await.expect("read"), Some(AgentStatus::Online));
    // It does not expire with the sign-in mark: an owner that died never signed the agent out.
    assert_eq!(p.n_signed_in(&t, &sales, 5_000).await.expect("read"), 0);
    assert_eq!(p.chosen_status(&t, &ann).await.expect("read"), Some(AgentStatus::Away));
    p.signed_out(&t, &ann, std::slice::from_ref(&sales)).await.expect("sign out");
    assert_eq!(p.chosen_status(&t, &ann).await.expect("read"), None);
    p.signed_out(&t, &agent("bob"), &[]).await.expect("sign out of no group");
    assert_eq!(p.chosen_status(&t, &agent("bob")).await.expect("read"), None);
}

async fn group_statuses_round_trip(p: &dyn Presence) {
    let t = tenant("acme");
    assert_eq!(p.group_statuses(&t).await.expect("read"), []);
    let support = GroupStatus::new(t.clone(), group("support"), true, 0, 10);
    let sales = GroupStatus::new(t.clone(), group("sales"), true, 3, 10);
    assert!(!support.online && sales.online);
    p.put_group_status(&support).await.expect("put");
    p.put_group_status(&sales).await.expect("put");
    p.put_group_status(&GroupStatus::new(tenant("other"), group("sales"), false, 1, 10)).await.expect("put");
    assert_eq!(p.group_statuses(&t).await.expect("read"), [sales.clone(), support]);
    let support = GroupStatus::new(t.clone(), group("support"), false, 2, 20);
    p.put_group_status(&support).await.expect("put");
    assert_eq!(p.group_statuses(&t).await.expect("read"), [sales, support]);
    assert_eq!(p.group_statuses(&tenant("other")).await.expect("read").len(), 1);
}

async fn the_license_is_mirrored(p: &dyn Presence) {
    assert_eq!(p.license_mirror().await.expect("read"), None);
    p.mirror_license(3, 10, 1_000).await.expect("mirror");
    assert_eq!(
        p.license_mirror().await.expect("read"),
        Some(LicenseMirror { used: 3, max_sessions: 10, at_ms: 1_000 })
    );
    p.mirror_license(4, 10, 2_000).await.expect("mirror");
    assert_eq!(
        p.license_mirror().await.expect("read"),
        Some(LicenseMirror { used: 4, max_sessions: 10, at_ms: 2_000 })
    );
}

async fn chat_starts_are_taken_from_each_addresss_budget(p: &dyn Presence) {
    // Six a minute (one every 10 s), three at once; instants of this century, in µs.
    let budget = StartBudget { per_minute: 6, burst: 3 };
    let t0: i64 = 1_800_000_000_000_000;
    let (home, office) = ("192.0.2.7", "2001:db8:1:2::/64");
    for _ in 0..3 {
        assert_eq!(p.take_chat_start(home, budget, t0).await.expect("take"), Ok(()));
    }
    assert_eq!(p.take_chat_start(home, budget, t0).await.expect("take"), Err(10_000), "a start's worth to wait");
    assert_eq!(p.take_chat_start(office, budget, t0).await.expect("take"), Ok(()), "each address its own");
    // The budget refills at the average rate, to the microsecond.
    assert_eq!(p.take_chat_start(home, budget, t0 + 9_999_000).await.expect("take"), Err(1));
    assert_eq!(p.take_chat_start(home, budget, t0 + 9_999_999).await.expect("take"), Err(1), "at least 1 ms");
    assert_eq!(p.take_chat_start(home, budget, t0 + 10_000_000).await.expect("take"), Ok(()));
    assert_eq!(p.take_chat_start(home, budget, t0 + 10_000_000).await.expect("take"), Err(10_000));
    // Refused starts take nothing: after 25 s two are back (and half of a third).
    let later = t0 + 35_000_000;
    for _ in 0..2 {
        assert_eq!(p.take_chat_start(home, budget, later).await.expect("take"), Ok(()));
    }
    assert_eq!(p.take_chat_start(home, budget, later).await.expect("take"), Err(5_000));
    // Never more than the burst, however long the address stayed away.
    let much_later = t0 + 3_600_000_000;
    for _ in 0..3 {
        assert_eq!(p.take_chat_start(home, budget, much_later).await.expect("take"), Ok(()));
    }
    assert_eq!(p.take_chat_start(home, budget, much_later).await.expect("take"), Err(10_000));
}

async fn a_chat_start_that_started_nothing_is_given_back(p: &dyn Presence) {
    let budget = StartBudget { per_minute: 6, burst: 3 };
    let t0: i64 = 1_800_000_000_000_000;
    let (home, office) = ("192.0.2.8", "198.51.100.1");
    for _ in 0..3 {
        assert_eq!(p.take_chat_start(home, budget, t0).await.expect("take"), Ok(()));
    }
    // One given back: one more may start at once, then none.
    p.give_back_chat_start(home, budget, t0 + 1_000).await.expect("give back");
    assert_eq!(p.take_chat_start(home, budget, t0 + 1_000).await.expect("take"), Ok(()));
    assert_eq!(p.take_chat_start(home, budget, t0 + 1_000).await.expect("take"), Err(9_999));
    // Never beyond a full budget: given back three times with one taken, three may start (not five).
    p.give_back_chat_start(home, budget, t0 + 3_600_000_000).await.expect("give back");
    assert_eq!(p.take_chat_start(home, budget, t0 + 3_600_000_000).await.expect("take"), Ok(()));
    for _ in 0..3 {
        p.give_back_chat_start(home, budget, t0 + 3_600_000_000).await.expect("give back");
    }
    for _ in 0..3 {
        assert_eq!(p.take_chat_start(home, budget, t0 + 3_600_000_000).await.expect("take"), Ok(()));
    }
    assert_eq!(p.take_chat_start(home, budget, t0 + 3_600_000_000).await.expect("take"), Err(10_000));
    // An address never seen has nothing to give back.
    p.give_back_chat_start(office, budget, t0).await.expect("give back");
    for _ in 0..3 {
        assert_eq!(p.take_chat_start(office, budget, t0).await.expect("take"), Ok(()));
    }
    assert_eq!(p.take_chat_start(office, budget, t0).await.expect("take"), Err(10_000));
}

async fn changes_are_published_when_something_changes(p: &dyn Presence) {
    let mut changes = p.changes();
    let (t, a) = (tenant("acme"), agent("ann"));
    let (sales, support) = (group("sales"), group("support"));

    p.session_alive(&t, &a, "s1", "gw1", 1_000).await.expect("alive");
    assert_eq!(
        next_change(&mut changes).await,
        PresenceChange::Session { tenant: t.clone(), agent: a.clone(), up: true }
    );
    // A refresh of a known session publishes nothing.
    p.session_alive(&t, &a, "s1", "gw1", 2_000).await.expect("refresh");
    assert_nothing_published(p, &mut changes, "m1").await;

    p.signed_in(&t, &a, AgentStatus::Online, std::slice::from_ref(&sales), 1_000).await.expect("sign in");
    p.signed_in(&t, &a, AgentStatus::Online, &[sales.clone(), support.clone()], 2_000).await.expect("sign in");
    let signed_in = |group: &GroupId, signed_in| PresenceChange::SignedIn {
        tenant: t.clone(),
        group: group.clone(),
        agent: a.clone(),
        signed_in,
    };
    assert_eq!(next_change(&mut changes).await, signed_in(&sales, true));
    assert_eq!(next_change(&mut changes).await, signed_in(&support, true));
    p.signed_in(&t, &a, AgentStatus::Online, &[sales.clone(), support.clone()], 3_000).await.expect("refresh");
    assert_nothing_published(p, &mut changes, "m2").await;

    let open = GroupStatus::new(t.clone(), sales.clone(), true, 1, 10);
    p.put_group_status(&open).await.expect("put");
    assert_eq!(next_change(&mut changes).await, PresenceChange::Group(open.clone()));
    // The same status evaluated again publishes nothing; a different one does.
    p.put_group_status(&GroupStatus { evaluated_at_ms: 20, ..open.clone() }).await.expect("put");
    assert_nothing_published(p, &mut changes, "m3").await;
    let closed = GroupStatus::new(t.clone(), sales.clone(), false, 1, 30);
    p.put_group_status(&closed).await.expect("put");
    assert_eq!(next_change(&mut changes).await, PresenceChange::Group(closed));

    p.signed_out(&t, &a, &[sales.clone(), support.clone(), group("never-in")]).await.expect("sign out");
    assert_eq!(next_change(&mut changes).await, signed_in(&sales, false));
    assert_eq!(next_change(&mut changes).await, signed_in(&support, false));
    p.session_gone(&t, &a, "s1", 1_500).await.expect("gone");
    assert_eq!(
        next_change(&mut changes).await,
        PresenceChange::Session { tenant: t.clone(), agent: a.clone(), up: false }
    );
    // Ending what is not live publishes nothing.
    p.session_gone(&t, &a, "s1", 1_500).await.expect("gone again");
    p.session_gone(&t, &a, "never-was", 1_500).await.expect("never was");
    p.signed_out(&t, &a, std::slice::from_ref(&sales)).await.expect("sign out again");
    assert_nothing_published(p, &mut changes, "m4").await;
}

/// Runs each scenario against a fresh `MemoryPresence` and against a `RedisPresence` on a server of its own.
macro_rules! suite {
    ($($scenario:ident),* $(,)?) => {
        mod in_memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(&MemoryPresence::new()).await;
                }
            )*
        }

        mod on_redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $scenario() {
                    let server = Redis::start().expect("redis-server");
                    let presence = RedisPresence::connect(&server.url(), RedisSettings::default())
                        .await
                        .expect("connect");
                    super::$scenario(&presence).await;
                }
            )*
        }
    };
}

suite!(
    expiry_is_by_value,
    a_chats_customer_is_here_gone_or_unknown,
    an_agent_may_have_several_sessions,
    many_ended_connections_read_as_the_last,
    signed_in_agents_are_counted_per_group,
    the_chosen_status_is_kept_until_sign_out,
    group_statuses_round_trip,
    the_license_is_mirrored,
    chat_starts_are_taken_from_each_addresss_budget,
    a_chat_start_that_started_nothing_is_given_back,
    changes_are_published_when_something_changes,
);

#[tokio::test]
async fn changes_reach_every_node() {
    let server = Redis::start().expect("redis-server");
    let one = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let two = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let mut changes = two.changes();
    one.session_alive(&tenant("acme"), &agent("ann"), "s1", "gw1", 1_000).await.expect("alive");
    assert_eq!(
        next_change(&mut changes).await,
        PresenceChange::Session { tenant: tenant("acme"), agent: agent("ann"), up: true }
    );
    assert_eq!(two.agents_present(&[(tenant("acme"), agent("ann"))], 0).await.expect("read"), [Connections::Here]);
}

#[tokio::test]
async fn a_prefix_separates_deployments() {
    let server = Redis::start().expect("redis-server");
    let blue = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let green_settings = RedisSettings { prefix: "green".into(), ..RedisSettings::default() };
    let green = RedisPresence::connect(&server.url(), green_settings).await.expect("connect");
    let mut green_changes = green.changes();
    blue.session_alive(&tenant("acme"), &agent("ann"), "s1", "gw1", 1_000).await.expect("alive");
    blue.mirror_license(1, 2, 3).await.expect("mirror");
    assert_eq!(green.agents_present(&[(tenant("acme"), agent("ann"))], 0).await.expect("read"), [Connections::Unknown]);
    assert_eq!(green.license_mirror().await.expect("read"), None);
    // Green's stream carries only green's changes.
    green.session_alive(&tenant("acme"), &agent("gus"), "s2", "gw1", 1_000).await.expect("alive");
    assert_eq!(
        next_change(&mut green_changes).await,
        PresenceChange::Session { tenant: tenant("acme"), agent: agent("gus"), up: true }
    );
}

#[tokio::test]
async fn foreign_values_are_reported_as_corrupt() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let client = ::redis::Client::open(server.url()).expect("url");
    let mut raw = client.get_multiplexed_async_connection().await.expect("raw connection");
    ::redis::cmd("SET").arg("sb:license").arg("not json").exec_async(&mut raw).await.expect("set");
    ::redis::cmd("HSET").arg("sb:group_status:acme").arg("sales").arg("{}").exec_async(&mut raw).await.expect("hset");
    ::redis::cmd("SET").arg("sb:session:acme:ann").arg("a string").exec_async(&mut raw).await.expect("set");
    ::redis::cmd("SET").arg("sb:status:acme:ann").arg("busy").exec_async(&mut raw).await.expect("set");
    assert!(matches!(presence.license_mirror().await, Err(PresenceError::Corrupt(_))));
    let error = presence.group_statuses(&tenant("acme")).await.expect_err("corrupt");
    assert!(matches!(&error, PresenceError::Corrupt(why) if why.contains("sales")), "{error}");
    let error = presence.agents_present(&[(tenant("acme"), agent("ann"))], 0).await.expect_err("wrong type");
    assert!(matches!(error, PresenceError::Corrupt(_)), "{error}");
    let error = presence.chosen_status(&tenant("acme"), &agent("ann")).await.expect_err("no such status");
    assert!(matches!(&error, PresenceError::Corrupt(why) if why.contains("busy")), "{error}");
    // A message on the channel that does not parse is skipped; the stream goes on.
    let mut changes = presence.changes();
    ::redis::cmd("PUBLISH").arg("sb:changes").arg("garbage").exec_async(&mut raw).await.expect("publish");
    presence.session_alive(&tenant("acme"), &agent("bob"), "s1", "gw1", 1_000).await.expect("alive");
    assert_eq!(
        next_change(&mut changes).await,
        PresenceChange::Session { tenant: tenant("acme"), agent: agent("bob"), up: true }
    );
}

#[tokio::test]
async fn connecting_without_a_server_fails_as_unavailable() {
    let port = switchboard_testservices::free_port().expect("port");
    let result = RedisPresence::connect(&format!("redis://127.0.0.1:{port}/"), RedisSettings::default()).await;
    assert!(matches!(result, Err(PresenceError::Unavailable(_))), "{result:?}");
    let result = RedisPresence::connect("http://not-redis", RedisSettings::default()).await;
    assert!(matches!(result, Err(PresenceError::Config(_))), "{result:?}");
}

#[tokio::test]
async fn the_change_stream_ends_when_the_last_clone_is_dropped() {
    let server = Redis::start().expect("redis-server");
    let presence = RedisPresence::connect(&server.url(), RedisSettings::default()).await.expect("connect");
    let mut changes = presence.changes();
    let clone = presence.clone();
    drop(presence);
    clone.session_alive(&tenant("acme"), &agent("ann"), "s1", "gw1", 1_000).await.expect("alive");
    assert!(matches!(next_change(&mut changes).await, PresenceChange::Session { up: true, .. }));
    drop(clone);
    // The background task stops and drops its sender: the stream closes.
    let end = tokio::time::timeout(DELIVERY, changes.recv()).await.expect("the stream closes");
    assert!(matches!(end, Err(broadcast::error::RecvError::Closed)), "{end:?}");
}

#[test]
fn connecting_outside_a_runtime_is_an_error_not_a_panic() {
    let result = RedisPresence::connect_lazy("redis://127.0.0.1:1/", RedisSettings::default());
    assert!(matches!(result, Err(PresenceError::Config(_))), "{result:?}");
}
