//! Every metric name, as in `docs/observability.md`. Labels are bounded (see that page).

// Every role.
pub const BUILD_INFO: &str = "switchboard_build_info";
pub const GRPC_SERVER_REQUESTS: &str = "switchboard_grpc_server_requests_total";
pub const GRPC_SERVER_REQUEST_DURATION: &str = "switchboard_grpc_server_request_duration_seconds";
pub const GRPC_SERVER_STREAMS_ENDED: &str = "switchboard_grpc_server_streams_ended_total";

// Gateway.
pub const GATEWAY_CONNECTIONS: &str = "switchboard_gateway_connections";
pub const GATEWAY_CONNECTIONS_MAX: &str = "switchboard_gateway_connections_max";
pub const GATEWAY_CONNECTIONS_OPENED: &str = "switchboard_gateway_connections_opened_total";
pub const GATEWAY_REQUESTS: &str = "switchboard_gateway_requests_total";
pub const GATEWAY_REFUSALS: &str = "switchboard_gateway_refusals_total";
pub const GATEWAY_SLOW_CONSUMER_DISCONNECTS: &str = "switchboard_gateway_slow_consumer_disconnects_total";
pub const GATEWAY_UNRESPONSIVE_DISCONNECTS: &str = "switchboard_gateway_unresponsive_disconnects_total";
pub const MESSAGE_LATENCY: &str = "switchboard_message_latency_seconds";
pub const OFFER_LATENCY: &str = "switchboard_offer_latency_seconds";

// Router.
pub const ROUTER_ACTORS: &str = "switchboard_router_actors";
pub const ROUTER_SHARDS_OWNED: &str = "switchboard_router_shards_owned";
pub const ROUTER_LEASE_RENEWALS: &str = "switchboard_router_lease_renewals_total";
pub const QUEUE_WAITING_CHATS: &str = "switchboard_queue_waiting_chats";
pub const QUEUE_OLDEST_WAIT: &str = "switchboard_queue_oldest_wait_seconds";
pub const QUEUE_WAIT: &str = "switchboard_queue_wait_seconds";
/// The group's waiting-time SLA (only for a group that has one).
pub const QUEUE_WAIT_SLA: &str = "switchboard_queue_wait_sla_seconds";
/// Chats waiting now that have waited past the group's SLA.
pub const QUEUE_SLA_BREACHED_CHATS: &str = "switchboard_queue_sla_breached_chats";
/// Chats that left the queue (however) after waiting past the group's SLA.
pub const QUEUE_SLA_BREACHES: &str = "switchboard_queue_sla_breaches_total";
pub const GROUP_OPEN: &str = "switchboard_group_open";
pub const GROUP_AGENTS_SIGNED_IN: &str = "switchboard_group_agents_signed_in";
pub const GROUP_AGENTS_ONLINE: &str = "switchboard_group_agents_online";
pub const CHATS_STARTED: &str = "switchboard_chats_started_total";
pub const CHATS_FINISHED: &str = "switchboard_chats_finished_total";
pub const CUSTOMERS_LEFT: &str = "switchboard_customers_left_total";
pub const OFFERS_ENDED: &str = "switchboard_offers_ended_total";
/// Routing state repaired from the store after a message between routers was lost, by kind.
pub const ROUTER_REPAIRS: &str = "switchboard_router_repairs_total";
/// A [`ROUTER_REPAIRS`] kind: an agent freed an offer whose end never reached them.
pub const REPAIR_OFFER_END_LOST: &str = "offer_end_lost";
/// A [`ROUTER_REPAIRS`] kind: an agent counted a chat they accepted whose answer never reached them.
pub const REPAIR_ACCEPT_ANSWER_LOST: &str = "accept_answer_lost";
/// A [`ROUTER_REPAIRS`] kind: a queue listed a chat waiting that it lacked.
pub const REPAIR_CHAT_LISTED: &str = "chat_listed";
/// A [`ROUTER_REPAIRS`] kind: a queue removed a chat listed that had left.
pub const REPAIR_CHAT_REMOVED: &str = "chat_removed";
/// A [`ROUTER_REPAIRS`] kind: an agent freed a chat counted as theirs whose end never reached them.
pub const REPAIR_CHAT_FREED: &str = "chat_freed";
/// A [`ROUTER_REPAIRS`] kind: an agent counted a chat of theirs they lacked (an accept's or a forward's
/// answer lost).
pub const REPAIR_CHAT_COUNTED: &str = "chat_counted";
/// Every kind of [`ROUTER_REPAIRS`].
pub const ROUTER_REPAIR_KINDS: &[&str] = &[
    REPAIR_OFFER_END_LOST,
    REPAIR_ACCEPT_ANSWER_LOST,
    REPAIR_CHAT_LISTED,
    REPAIR_CHAT_REMOVED,
    REPAIR_CHAT_FREED,
    REPAIR_CHAT_COUNTED,
];

// Store.
/// An append as its caller waits for it: queued for the writer, written in a batch, made durable.
pub const STORE_APPEND_DURATION: &str = "switchboard_store_append_duration_seconds";
pub const STORE_APPEND_BATCH_DURATION: &str = "switchboard_store_append_batch_duration_seconds";
pub const STORE_APPEND_BATCH_SIZE: &str = "switchboard_store_append_batch_size";
pub const STORE_APPENDS: &str = "switchboard_store_appends_total";
pub const STORE_WAL_SYNC_DURATION: &str = "switchboard_store_wal_sync_duration_seconds";
pub const STORE_WRITER_FAILED: &str = "switchboard_store_writer_failed";
pub const LICENSE_SESSIONS_IN_USE: &str = "switchboard_license_sessions_in_use";
pub const LICENSE_SESSIONS_MAX: &str = "switchboard_license_sessions_max";

/// Bucket bounds (seconds) of the latencies of the message path: sub-millisecond to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds (seconds) of how long chats wait in a queue.
pub const WAIT_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];
/// Bucket bounds of a group commit's number of appends.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
