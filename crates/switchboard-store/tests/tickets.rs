//! Tickets (offline messages): stored once per tenant and idempotency key, listed newest first. Every
//! scenario runs against each backend (see `on_every_backend!`).

mod common;

use common::*;
use switchboard_proto::internal::v1::{CreateTicketRequest, ListTicketsRequest, TicketRecord};
use switchboard_proto::store::{StoreApi, StoreError};

on_every_backend!(tickets_are_stored_once_per_key_and_listed_newest_first, incomplete_or_clashing_tickets_are_invalid);

async fn ids(store: &dyn StoreApi, tenant: &str, limit: u32) -> Vec<String> {
    let request = ListTicketsRequest { tenant_id: tenant.into(), limit };
    store.list_tickets(request).await.unwrap().tickets.into_iter().map(|ticket| ticket.id).collect()
}

async fn tickets_are_stored_once_per_key_and_listed_newest_first(h: Harness) {
    let store = h.store();
    let t1 = TicketRecord {
        conversation_id: "c9".into(),
        reason: "license_exhausted".into(),
        ..ticket("t1", "acme", "k1", 10)
    };
    for record in
        [t1.clone(), ticket("t2", "acme", "k2", 30), ticket("t3", "globex", "k1", 20), ticket("t4", "acme", "k4", 30)]
    {
        let created = store.create_ticket(CreateTicketRequest { ticket: Some(record.clone()) }).await.unwrap();
        assert_eq!((created.ticket, created.duplicate), (Some(record), false));
    }

    // A retry, even with another id and text, is the first ticket.
    let retry = TicketRecord { body: "again".into(), ..ticket("t1-retry", "acme", "k1", 40) };
    let created = store.create_ticket(CreateTicketRequest { ticket: Some(retry) }).await.unwrap();
    assert_eq!((created.ticket, created.duplicate), (Some(t1.clone()), true));

    assert_eq!(ids(store, "acme", 0).await, ["t4", "t2", "t1"], "newest first, then by id");
    assert_eq!(ids(store, "acme", 2).await, ["t4", "t2"]);
    assert_eq!(ids(store, "globex", 0).await, ["t3"]);
    assert_eq!(ids(store, "", 0).await, ["t4", "t2", "t3", "t1"], "every tenant");
    assert_eq!(ids(store, "initech", 0).await, Vec::<String>::new());
    let listed = store.list_tickets(ListTicketsRequest { tenant_id: "acme".into(), limit: 0 }).await.unwrap();
    assert_eq!(listed.tickets[2], t1, "the whole record");
}

async fn incomplete_or_clashing_tickets_are_invalid(h: Harness) {
    let store = h.store();
    let missing = [
        TicketRecord { id: String::new(), ..ticket("t1", "acme", "k1", 1) },
        TicketRecord { tenant_id: String::new(), ..ticket("t1", "acme", "k1", 1) },
        TicketRecord { group_id: String::new(), ..ticket("t1", "acme", "k1", 1) },
        TicketRecord { kind: String::new(), ..ticket("t1", "acme", "k1", 1) },
        TicketRecord { body: String::new(), ..ticket("t1", "acme", "k1", 1) },
        TicketRecord { idempotency_key: String::new(), ..ticket("t1", "acme", "k1", 1) },
    ];
    for record in missing {
        let result = store.create_ticket(CreateTicketRequest { ticket: Some(record.clone()) }).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{record:?}: {result:?}");
    }
    let result = store.create_ticket(CreateTicketRequest { ticket: None }).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    assert_eq!(ids(store, "", 0).await, Vec::<String>::new(), "nothing stored");

    // Optional fields may be empty.
    let bare = TicketRecord {
        reason: String::new(),
        customer_name: String::new(),
        customer_contact: String::new(),
        subject: String::new(),
        ..ticket("t1", "acme", "k1", 1)
    };
    store.create_ticket(CreateTicketRequest { ticket: Some(bare) }).await.unwrap();
    // Another ticket with a taken id is refused; the key is not taken by it.
    let clash = store.create_ticket(CreateTicketRequest { ticket: Some(ticket("t1", "acme", "k2", 2)) }).await;
    assert!(matches!(clash, Err(StoreError::Invalid(_))), "{clash:?}");
    let other = store.create_ticket(CreateTicketRequest { ticket: Some(ticket("t2", "acme", "k2", 2)) }).await;
    assert!(!other.unwrap().duplicate);
    assert_eq!(ids(store, "acme", 0).await, ["t2", "t1"]);
}
