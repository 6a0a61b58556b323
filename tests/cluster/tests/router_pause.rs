//! A router is frozen with SIGSTOP for longer than its lease under traffic, then let go with SIGCONT: the
//! others take its shards at new epochs while it sleeps, the conversations go on, and once it wakes it no
//! longer serves them. Nothing was written under its old epochs after the takeover, and a write under its old
//! fence is refused by the store.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use switchboard_cluster_tests::{ClusterSpec, Run};
use switchboard_proto::internal::v1::router_service_client::RouterServiceClient;
use switchboard_proto::internal::v1::store_service_client::StoreServiceClient;
use switchboard_proto::internal::v1::{AppendRequest, Caller, ChatViewRequest, Fence, NewEvent, caller};
use tokio::time::Instant;

const CHATS: usize = 12;
const PACE: Duration = Duration::from_millis(250);
/// The metadata entry with the stable error code of an internal gRPC error.
const ERROR_CODE: &str = "x-switchboard-error";

fn error_code(status: &tonic::Status) -> Option<&str> {
    status.metadata().get(ERROR_CODE).and_then(|value| value.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_paused_past_its_lease_is_fenced_off() -> anyhow::Result<()> {
    let spec = ClusterSpec::new("");
    let lease = spec.lease;
    let mut run = Run::start(spec, CHATS, PACE).await?;
    let (victim, owned) = run.cluster.router_owning_most(&run.conversations).await?;
    let victim_conversations = run.conversations_of(&victim).await?;
    let placement = run.cluster.db.placement().await?;
    let old_fences: BTreeMap<u32, u64> = placement
        .leases
        .iter()
        .filter(|lease| lease.owner == victim && lease.expires_at_ms > placement.now_ms)
        .map(|lease| (lease.shard, lease.epoch))
        .collect();
    eprintln!("pausing {victim}: {} shards, {owned} of {CHATS} conversations", old_fences.len());

    let log_before_pause = run.cluster.router(&victim)?.log().len();
    let paused_at = Instant::now();
    run.cluster.router(&victim)?.sigstop().await?;

    // While it sleeps, every one of its shards is taken by another router at a higher epoch.
    let takeover_db_ms = run
        .cluster
        .poll_db("the paused router's shards are taken over", Duration::from_secs(30), async |db| {
            let placement = db.placement().await?;
            let taken = old_fences.iter().all(|(&shard, &epoch)| {
                placement.lease(shard).is_some_and(|lease| {
                    lease.owner != victim && lease.epoch > epoch && lease.expires_at_ms > placement.now_ms
                })
            });
            Ok(taken.then_some(placement.now_ms))
        })
        .await?;
    let takeover = paused_at.elapsed();
    eprintln!("its shards were taken over {takeover:?} after the pause (lease {:?})", lease.lease());
    // Nobody took them before its lease ran out (it renewed at most `renew_every` before the pause).
    ensure!(
        takeover + Duration::from_millis(lease.renew_every_ms) >= lease.lease(),
        "shards taken {takeover:?} after the pause, before the lease ({:?}) could expire",
        lease.lease()
    );
    let worst =
        run.wait_continued("every conversation goes on while it sleeps", paused_at, Duration::from_secs(40)).await?;
    eprintln!("every conversation had a new message acked within {worst:?} of the pause");

    run.cluster.router(&victim)?.sigcont().await?;
    let resumed_at = Instant::now();

    // A write under its old fence (what the woken router's actors would attempt) is refused by the store.
    let conversation = victim_conversations.first().context("the victim owns a conversation")?.clone();
    let shard = run.cluster.owner_of(&conversation).await?.shard;
    let stale_epoch = *old_fences.get(&shard).context("the conversation's shard was the victim's")?;
    let mut store = StoreServiceClient::connect(run.cluster.stores[0].http_url()).await?;
    let stale_write = AppendRequest {
        fence: Some(Fence { shard, epoch: stale_epoch }),
        conversation_id: conversation.clone(),
        events: vec![NewEvent {
            at_ms: 1,
            author_role: "customer".to_owned(),
            author_id: String::new(),
            client_msg_id: "customer//stale-write".to_owned(),
            kind: "message".to_owned(),
            payload_json: r#"{"seq":0,"at_ms":1,"author":{"role":"customer"},"client_msg_id":"stale-write","kind":"message","body":"stale"}"#.to_owned(),
        }],
        ..Default::default()
    };
    let refused = store.append(stale_write).await.expect_err("a write under a stale fence is refused");
    assert_eq!(error_code(&refused), Some("stale_epoch"), "{refused:?}");
    let stored = run.cluster.db.events_of(&conversation).await?;
    assert!(stored.iter().all(|event| event.client_msg_id.as_deref() != Some("stale-write")));

    // Awake, it answers `not_owner` for a conversation of its old shards now owned by another router.
    let mut router = RouterServiceClient::connect(run.cluster.router(&victim)?.http_url()).await?;
    let moved = run.cluster.owners(&victim_conversations).await?.into_iter().find(|(_, owner)| *owner != victim);
    if let Some((conversation, owner)) = moved {
        let request = ChatViewRequest {
            caller: Some(Caller { who: Some(caller::Who::CustomerConversationId(conversation.clone())) }),
            conversation_id: conversation.clone(),
        };
        let answer = router.chat_view(request).await;
        let refused = answer.expect_err("the woken router must not serve a conversation it lost");
        assert_eq!(error_code(&refused), Some("not_owner"), "{refused:?}");
        eprintln!("woken, {victim} answers not_owner for {conversation} (now {owner}'s)");
    }
    // And it says so: its log since the pause mentions its shards (it gives them up when it finds its renew
    // deadline passed).
    let mut said = String::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        said = run.cluster.router(&victim)?.log().get(log_before_pause..).unwrap_or_default().to_owned();
        if said.to_lowercase().contains("shard") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(said.to_lowercase().contains("shard"), "woken, {victim} logged nothing about its shards: {said:?}");
    eprintln!("woken, {victim} logged: {}", said.trim());
    let worst_after =
        run.wait_continued("every conversation goes on after it wakes", resumed_at, Duration::from_secs(30)).await?;
    eprintln!("after SIGCONT every conversation had a new message acked within {worst_after:?}");

    // Every participant gets every event as a live push on the connection it has (no resume needed): the
    // gateways follow every conversation on its new owners through both moves.
    let outcome = run.finish(true).await?;
    // Nothing carries its old epochs that was decided after the takeover (checker (e) also proves that no
    // conversation's epochs ever go back).
    let shards: BTreeMap<String, u32> =
        outcome.cluster.db.conversations().await?.into_iter().map(|row| (row.id, row.shard)).collect();
    let stale: Vec<String> = outcome
        .cluster
        .db
        .events()
        .await?
        .into_iter()
        .filter(|event| event.at_ms >= takeover_db_ms)
        .filter(|event| {
            let shard = shards.get(&event.conversation_id);
            shard.and_then(|shard| old_fences.get(shard)).is_some_and(|&old| event.epoch == Some(old))
        })
        .map(|event| format!("{} seq {} at epoch {:?}", event.conversation_id, event.seq, event.epoch))
        .collect();
    assert!(stale.is_empty(), "events written at the paused router's old epochs after the takeover: {stale:?}");
    eprintln!("{}", outcome.summary());
    outcome.cluster.finish();
    Ok(())
}
