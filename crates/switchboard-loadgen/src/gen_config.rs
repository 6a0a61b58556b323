//! `gen-config`: a Switchboard configuration for load tests, in the format of
//! `crates/switchboard/src/config.rs` (version 1, unknown fields refused): one tenant `load` with the
//! widget key `load-widget-key`, groups `g0..`, agents `a0..` with tokens `load-agent-token-0..`, every
//! agent in every group; with `--customer-heartbeat-ms`/`--abandon-after-ms`, a `presence` section.

use serde::Serialize;

use crate::cli::GenConfigArgs;

pub const TENANT: &str = "load";
pub const WIDGET_KEY: &str = "load-widget-key";
pub const AGENT_TOKEN_PREFIX: &str = "load-agent-token-";

#[derive(Serialize)]
struct Config {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    license: Option<License>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence: Option<Presence>,
    limits: Limits,
    tenants: Vec<Tenant>,
}

#[derive(Serialize)]
struct License {
    max_sessions: u64,
}

#[derive(Serialize)]
struct Presence {
    #[serde(skip_serializing_if = "Option::is_none")]
    customer_heartbeat_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    abandon_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct Limits {
    #[serde(skip_serializing_if = "Option::is_none")]
    outbound_queue_len: Option<u32>,
    requests_per_second: u32,
    request_burst: u32,
}

#[derive(Serialize)]
struct Tenant {
    id: String,
    name: String,
    widget_keys: Vec<String>,
    groups: Vec<Group>,
    agents: Vec<Agent>,
}

#[derive(Serialize)]
struct Group {
    id: String,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<Routing>,
}

#[derive(Serialize)]
struct Routing {
    mode: &'static str,
    offer_timeout_ms: u64,
}

#[derive(Serialize)]
struct Agent {
    id: String,
    name: String,
    token: String,
    groups: Vec<String>,
    capacity: u32,
}

/// The YAML text of the configuration.
pub fn render(args: &GenConfigArgs) -> anyhow::Result<String> {
    if args.groups == 0 {
        anyhow::bail!("--groups: at least one group is needed");
    }
    if args.push_offer_timeout_ms == Some(0) {
        anyhow::bail!("--push-offer-timeout-ms must be positive");
    }
    let group_ids: Vec<String> = (0..args.groups).map(|n| format!("g{n}")).collect();
    let groups = group_ids
        .iter()
        .map(|id| Group {
            id: id.clone(),
            name: format!("Group {id}"),
            routing: args.push_offer_timeout_ms.map(|offer_timeout_ms| Routing { mode: "push", offer_timeout_ms }),
        })
        .collect();
    let agents = (0..args.agents)
        .map(|n| Agent {
            id: format!("a{n}"),
            name: format!("Agent {n}"),
            token: format!("{AGENT_TOKEN_PREFIX}{n}"),
            groups: group_ids.clone(),
            capacity: args.capacity,
        })
        .collect();
    let config = Config {
        version: 1,
        license: args.license.map(|max_sessions| License { max_sessions }),
        presence: (args.customer_heartbeat_ms.is_some() || args.abandon_after_ms.is_some()).then_some(Presence {
            customer_heartbeat_ms: args.customer_heartbeat_ms,
            abandon_after_ms: args.abandon_after_ms,
        }),
        limits: Limits {
            outbound_queue_len: args.outbound_queue_len,
            requests_per_second: args.requests_per_second,
            request_burst: args.request_burst,
        },
        tenants: vec![Tenant {
            id: TENANT.into(),
            name: "Load test".into(),
            widget_keys: vec![WIDGET_KEY.into()],
            groups,
            agents,
        }],
    };
    let yaml = serde_yaml_ng::to_string(&config)?;
    Ok(format!("# Written by switchboard-loadgen gen-config: `switchboard serve --config FILE`.\n{yaml}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_has_every_agent_in_every_group() {
        let args = GenConfigArgs {
            agents: 2,
            groups: 2,
            capacity: 5,
            license: Some(20),
            push_offer_timeout_ms: Some(1500),
            outbound_queue_len: None,
            requests_per_second: 0,
            request_burst: 100,
            customer_heartbeat_ms: None,
            abandon_after_ms: Some(1_000),
            out: "x".into(),
        };
        let yaml = render(&args).unwrap();
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(value["license"]["max_sessions"], 20);
        assert_eq!(value["presence"]["abandon_after_ms"], 1_000);
        assert!(value["presence"].get("customer_heartbeat_ms").is_none(), "the server's default");
        // A generator's connection carries many people's requests: no request budget unless asked.
        assert_eq!(value["limits"]["requests_per_second"], 0);
        assert!(value["limits"].get("outbound_queue_len").is_none());
        let tenant = &value["tenants"][0];
        assert_eq!(tenant["widget_keys"][0], "load-widget-key");
        assert_eq!(tenant["groups"][1]["id"], "g1");
        assert_eq!(tenant["groups"][1]["routing"]["mode"], "push");
        assert_eq!(tenant["groups"][1]["routing"]["offer_timeout_ms"], 1500);
        assert_eq!(tenant["agents"][1]["token"], "load-agent-token-1");
        assert_eq!(tenant["agents"][1]["capacity"], 5);
        assert_eq!(tenant["agents"][1]["groups"].as_sequence().unwrap().len(), 2);
    }
}
