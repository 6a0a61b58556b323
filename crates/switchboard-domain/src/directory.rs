//! The tenancy directory: tenants, their support groups and agents, widget keys and agent tokens.
//! Built once from the configuration file and validated then; read-only afterwards.

use std::collections::{BTreeMap, HashMap};

use crate::{AgentId, GroupId, TenantId};

/// How a group's waiting chats reach its agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Agents see the waiting queue and accept; the first accept wins.
    #[default]
    Pull,
    /// The chat at the head of the queue is offered to one available agent at a time, longest idle first;
    /// a reject or `offer_timeout_ms` without an answer passes it to the next.
    Push { offer_timeout_ms: i64 },
}

#[derive(Debug, Clone)]
pub struct GroupEntry {
    pub id: GroupId,
    pub name: String,
    pub routing: Routing,
    /// When the group is open; a group without a schedule is always open.
    pub hours: crate::BusinessHours,
    /// The group's waiting-time SLA: a chat waiting longer breaches it (flagged to consoles through the
    /// group's info, counted in the queue's metrics, alerted on). `None`: the group has none.
    pub wait_sla_ms: Option<i64>,
}

impl GroupEntry {
    /// The waiting-time SLA of a group that does not set its own: two minutes.
    pub const DEFAULT_WAIT_SLA_MS: i64 = 120_000;

    /// A pull-routed group that is always open, with the default waiting-time SLA.
    pub fn new(id: GroupId, name: impl Into<String>) -> Self {
        GroupEntry {
            id,
            name: name.into(),
            routing: Routing::Pull,
            hours: crate::BusinessHours::always_open(),
            wait_sla_ms: Some(Self::DEFAULT_WAIT_SLA_MS),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    pub id: AgentId,
    pub name: String,
    pub groups: Vec<GroupId>,
    pub capacity: u32,
}

#[derive(Debug, Clone)]
pub struct TenantEntry {
    pub id: TenantId,
    pub name: String,
    pub groups: BTreeMap<GroupId, GroupEntry>,
    pub agents: BTreeMap<AgentId, AgentEntry>,
}

/// Why a directory was refused. Each names the offending entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("tenant {0} is defined twice")]
    DuplicateTenant(TenantId),
    #[error("tenant {tenant}: agent {agent} belongs to unknown group {group}")]
    UnknownGroup { tenant: TenantId, agent: AgentId, group: GroupId },
    #[error("tenant {tenant}: agent {agent} must have a capacity of at least 1")]
    ZeroCapacity { tenant: TenantId, agent: AgentId },
    #[error("a widget key is used twice (tenant {0})")]
    DuplicateWidgetKey(TenantId),
    #[error("an agent token is used twice (tenant {tenant}, agent {agent})")]
    DuplicateAgentToken { tenant: TenantId, agent: AgentId },
    #[error("tenant {0}: a secret (widget key or agent token) must be at least 8 characters")]
    WeakSecret(TenantId),
}

#[derive(Debug, Clone, Default)]
pub struct Directory {
    tenants: BTreeMap<TenantId, TenantEntry>,
    widget_keys: HashMap<String, TenantId>,
    agent_tokens: HashMap<String, (TenantId, AgentId)>,
}

const MIN_SECRET_LEN: usize = 8;

impl Directory {
    pub fn add_tenant(
        &mut self,
        tenant: TenantEntry,
        widget_keys: Vec<String>,
        agent_tokens: Vec<(AgentId, String)>,
    ) -> Result<(), DirectoryError> {
        if self.tenants.contains_key(&tenant.id) {
            return Err(DirectoryError::DuplicateTenant(tenant.id));
        }
        for agent in tenant.agents.values() {
            if agent.capacity == 0 {
                return Err(DirectoryError::ZeroCapacity { tenant: tenant.id.clone(), agent: agent.id.clone() });
            }
            if let Some(group) = agent.groups.iter().find(|group| !tenant.groups.contains_key(group)) {
                return Err(DirectoryError::UnknownGroup {
                    tenant: tenant.id.clone(),
                    agent: agent.id.clone(),
                    group: group.clone(),
                });
            }
        }
        let weak = |secret: &String| secret.len() < MIN_SECRET_LEN;
        if widget_keys.iter().any(weak) || agent_tokens.iter().any(|(_, token)| weak(token)) {
            return Err(DirectoryError::WeakSecret(tenant.id));
        }
        for key in widget_keys {
            if self.widget_keys.insert(key, tenant.id.clone()).is_some() {
                return Err(DirectoryError::DuplicateWidgetKey(tenant.id));
            }
        }
        for (agent, token) in agent_tokens {
            if self.agent_tokens.insert(token, (tenant.id.clone(), agent.clone())).is_some() {
                return Err(DirectoryError::DuplicateAgentToken { tenant: tenant.id, agent });
            }
        }
        self.tenants.insert(tenant.id.clone(), tenant);
        Ok(())
    }

    pub fn tenant(&self, tenant: &TenantId) -> Option<&TenantEntry> {
        self.tenants.get(tenant)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &TenantEntry> {
        self.tenants.values()
    }

    pub fn group(&self, tenant: &TenantId, group: &GroupId) -> Option<&GroupEntry> {
        self.tenants.get(tenant)?.groups.get(group)
    }

    /// The agents who are members of a group.
    pub fn members_of<'a>(&'a self, tenant: &TenantId, group: &'a GroupId) -> impl Iterator<Item = &'a AgentEntry> {
        self.tenants
            .get(tenant)
            .into_iter()
            .flat_map(move |entry| entry.agents.values().filter(move |agent| agent.groups.contains(group)))
    }

    pub fn agent(&self, tenant: &TenantId, agent: &AgentId) -> Option<&AgentEntry> {
        self.tenants.get(tenant)?.agents.get(agent)
    }

    pub fn tenant_of_widget_key(&self, widget_key: &str) -> Option<&TenantId> {
        self.widget_keys.get(widget_key)
    }

    pub fn agent_of_token(&self, token: &str) -> Option<&(TenantId, AgentId)> {
        self.agent_tokens.get(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(agent_groups: &[&str], capacity: u32) -> TenantEntry {
        let group = GroupEntry::new(GroupId::new("g1").unwrap(), "G1");
        let agent = AgentEntry {
            id: AgentId::new("a").unwrap(),
            name: "A".into(),
            groups: agent_groups.iter().map(|g| GroupId::new(*g).unwrap()).collect(),
            capacity,
        };
        TenantEntry {
            id: TenantId::new("t").unwrap(),
            name: "T".into(),
            groups: [(group.id.clone(), group)].into(),
            agents: [(agent.id.clone(), agent)].into(),
        }
    }

    #[test]
    fn a_valid_tenant_resolves_its_keys_and_tokens() {
        let mut directory = Directory::default();
        let agent = AgentId::new("a").unwrap();
        directory
            .add_tenant(tenant(&["g1"], 2), vec!["widget-key-1".into()], vec![(agent.clone(), "token-of-a".into())])
            .unwrap();
        assert_eq!(directory.tenant_of_widget_key("widget-key-1").unwrap().as_str(), "t");
        assert_eq!(directory.agent_of_token("token-of-a").unwrap().1, agent);
        assert!(directory.agent_of_token("nope").is_none());
    }

    #[test]
    fn bad_directories_are_refused_with_the_offending_entry() {
        let mut directory = Directory::default();
        let error = directory.add_tenant(tenant(&["nope"], 2), vec![], vec![]).unwrap_err();
        assert!(matches!(error, DirectoryError::UnknownGroup { .. }), "{error}");
        let error = directory.add_tenant(tenant(&["g1"], 0), vec![], vec![]).unwrap_err();
        assert!(matches!(error, DirectoryError::ZeroCapacity { .. }));
        let error = directory.add_tenant(tenant(&["g1"], 1), vec!["short".into()], vec![]).unwrap_err();
        assert!(matches!(error, DirectoryError::WeakSecret(_)));
        directory.add_tenant(tenant(&["g1"], 1), vec![], vec![]).unwrap();
        let error = directory.add_tenant(tenant(&["g1"], 1), vec![], vec![]).unwrap_err();
        assert!(matches!(error, DirectoryError::DuplicateTenant(_)));
    }
}
