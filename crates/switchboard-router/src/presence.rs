//! What a router reads of presence: whether a group is online (open by its hours, at least one agent
//! signed in). Presence may be stale (Redis down): then the last status this node knew stands, with the
//! business hours evaluated here.

use std::sync::Arc;

use switchboard_domain::{GroupId, TenantId};
use tracing::debug;

use crate::context::Context;

/// Whether the group is online now.
pub(crate) async fn group_online(context: &Arc<Context>, tenant: &TenantId, group: &GroupId) -> bool {
    let now_ms = context.clock.now_ms();
    let open = context.directory.group(tenant, group).is_some_and(|entry| entry.hours.is_open(now_ms));
    if !open {
        return false;
    }
    match context.presence.n_signed_in(tenant, group, now_ms).await {
        Ok(signed_in) => signed_in > 0,
        Err(error) => {
            debug!(%error, %group, "presence unavailable: the last group status known stands");
            let statuses = context.group_statuses.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            statuses.get(&(tenant.clone(), group.clone())).is_some_and(|status| status.signed_in > 0)
        }
    }
}
