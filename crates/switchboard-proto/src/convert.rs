//! Conversions between the store's protobuf records and the domain types.

use switchboard_domain::{
    AgentId, Author, Conversation, ConversationId, ConversationState, Event, GroupId, Offer, TenantId,
};

use crate::internal::v1::{ConversationRecord, EventRecord, NewEvent};

/// A record that does not hold what the domain expects (a corrupt row or a bug): never client input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} in a store record: {detail}")]
pub struct RecordError {
    pub what: &'static str,
    pub detail: String,
}

fn bad(what: &'static str, detail: impl ToString) -> RecordError {
    RecordError { what, detail: detail.to_string() }
}

pub fn author_parts(author: &Author) -> (&'static str, &str) {
    match author {
        Author::Customer => ("customer", ""),
        Author::Agent(agent) => ("agent", agent.as_str()),
        Author::System => ("system", ""),
    }
}

/// The key the store deduplicates a message on: the client message id *of its author*, so that two
/// participants who happen to choose the same id never swallow each other's messages.
pub fn dedupe_key(author: &Author, client_msg_id: &str) -> String {
    let (role, id) = author_parts(author);
    format!("{role}/{id}/{client_msg_id}")
}

/// The record to append for a domain event (its seq is assigned by the store).
pub fn new_event(event: &Event) -> NewEvent {
    let (author_role, author_id) = author_parts(&event.author);
    NewEvent {
        at_ms: event.at_ms,
        author_role: author_role.to_owned(),
        author_id: author_id.to_owned(),
        client_msg_id: event.client_msg_id.as_deref().map(|id| dedupe_key(&event.author, id)).unwrap_or_default(),
        kind: event.body.kind().to_owned(),
        payload_json: serde_json::to_string(event).unwrap_or_default(),
    }
}

/// The domain event of a stored record, with the seq the store gave it.
pub fn event_from_record(record: &EventRecord) -> Result<Event, RecordError> {
    let mut event: Event = serde_json::from_str(&record.payload_json).map_err(|error| bad("event payload", error))?;
    event.seq = record.seq;
    Ok(event)
}

pub fn conversation_id(text: &str) -> Result<ConversationId, RecordError> {
    ConversationId::parse(text).map_err(|error| bad("conversation id", error))
}

/// The conversation summary as a domain state. Its delivery marks read 0 when the record does not know them
/// (`delivery_marks_known`: a chat stored, or last updated, by a router from before they were kept), and the
/// chat's log tells them.
pub fn conversation_from_record(record: &ConversationRecord) -> Result<Conversation, RecordError> {
    let optional_ms = |ms: i64| (ms != 0).then_some(ms);
    Ok(Conversation {
        id: conversation_id(&record.id)?,
        tenant: TenantId::new(record.tenant_id.clone()).map_err(|error| bad("tenant id", error))?,
        group: GroupId::new(record.group_id.clone()).map_err(|error| bad("group id", error))?,
        customer_name: record.customer_name.clone(),
        first_question: record.first_question.clone(),
        state: ConversationState::parse(&record.state).ok_or_else(|| bad("state", &record.state))?,
        owner: match record.owner_agent_id.as_str() {
            "" => None,
            agent => Some(AgentId::new(agent).map_err(|error| bad("owner", error))?),
        },
        created_at_ms: record.created_at_ms,
        queued_at_ms: record.queued_at_ms,
        accepted_at_ms: optional_ms(record.accepted_at_ms),
        closed_at_ms: optional_ms(record.closed_at_ms),
        last_seq: record.last_seq,
        customer_delivered_up_to: record.customer_delivered_up_to,
        agent_delivered_up_to: record.agent_delivered_up_to,
        offer: match record.offer_agent_id.as_str() {
            "" => None,
            agent => Some(Offer {
                agent: AgentId::new(agent).map_err(|error| bad("offer agent", error))?,
                expires_at_ms: record.offer_expires_at_ms,
            }),
        },
        offered_to: record
            .offered_to
            .iter()
            .map(|agent| AgentId::new(agent.clone()).map_err(|error| bad("offered to", error)))
            .collect::<Result<_, _>>()?,
        customer_away: record.customer_away,
    })
}

#[cfg(test)]
mod tests {
    use switchboard_domain::EventBody;

    use super::*;

    #[test]
    fn events_survive_the_round_trip_through_a_record() {
        let event = Event {
            seq: 0,
            at_ms: 42,
            author: Author::Agent(AgentId::new("alice").unwrap()),
            client_msg_id: Some("m-1".into()),
            body: EventBody::Message { body: "hello".into() },
        };
        let stored = new_event(&event);
        assert_eq!((stored.author_role.as_str(), stored.author_id.as_str()), ("agent", "alice"));
        assert_eq!(stored.kind, "message");
        // The store deduplicates per author; the client sees its own id.
        assert_eq!(stored.client_msg_id, "agent/alice/m-1");
        let record = EventRecord { seq: 7, payload_json: stored.payload_json, ..Default::default() };
        assert_eq!(event_from_record(&record).unwrap(), Event { seq: 7, ..event });
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let record = EventRecord { payload_json: "{".into(), ..Default::default() };
        assert_eq!(event_from_record(&record).unwrap_err().what, "event payload");
        let conversation = ConversationRecord { id: "x".into(), ..Default::default() };
        assert!(conversation_from_record(&conversation).is_err());
    }
}
