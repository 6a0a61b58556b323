//! Activation of virtual actors: the first use of a key loads the actor's state and spawns it; later uses
//! find it. Concurrent first uses of one key load and spawn once.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use ractor::{ActorRef, ActorStatus, Message};
use switchboard_proto::router::RouterError;
use tokio::sync::OnceCell;

type Slot<M> = Arc<OnceCell<ActorRef<M>>>;

pub(crate) struct Registry<K, M: Message> {
    slots: Mutex<HashMap<K, Slot<M>>>,
}

impl<K: Eq + Hash + Clone, M: Message> Default for Registry<K, M> {
    fn default() -> Self {
        Registry { slots: Mutex::new(HashMap::new()) }
    }
}

/// Whether an actor still takes messages.
pub(crate) fn is_alive<M: Message>(actor: &ActorRef<M>) -> bool {
    !matches!(actor.get_status(), ActorStatus::Stopping | ActorStatus::Stopped)
}

impl<K: Eq + Hash + Clone, M: Message> Registry<K, M> {
    fn slot(&self, key: &K) -> Slot<M> {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = slots.entry(key.clone()).or_default();
        // A stopped actor is replaced by a fresh activation.
        if slot.get().is_some_and(|actor| !is_alive(actor)) {
            *slot = Arc::default();
        }
        slot.clone()
    }

    /// The running actor for `key`, activated with `activate` when there is none.
    pub(crate) async fn get_or_activate<F, Fut>(&self, key: &K, activate: F) -> Result<ActorRef<M>, RouterError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<ActorRef<M>, RouterError>>,
    {
        let slot = self.slot(key);
        let actor = slot.get_or_try_init(activate).await?;
        Ok(actor.clone())
    }

    /// Forgets the actor of `key` if it is `actor` (it stopped).
    pub(crate) fn forget(&self, key: &K, actor: &ActorRef<M>) {
        let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if slots.get(key).and_then(|slot| slot.get()).is_some_and(|current| current.get_id() == actor.get_id()) {
            slots.remove(key);
        }
    }

    /// The actor of `key` if it is running (never activates one).
    pub(crate) fn get_running(&self, key: &K) -> Option<ActorRef<M>> {
        let slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots.get(key).and_then(|slot| slot.get()).filter(|actor| is_alive(actor)).cloned()
    }

    /// Every running actor (for the periodic tick).
    pub(crate) fn running(&self) -> Vec<(K, ActorRef<M>)> {
        let slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .iter()
            .filter_map(|(key, slot)| {
                slot.get().filter(|actor| is_alive(actor)).map(|actor| (key.clone(), actor.clone()))
            })
            .collect()
    }

    /// Stops and forgets every actor whose key matches (the node gave up the key's shard).
    pub(crate) fn stop_where(&self, matches: impl Fn(&K) -> bool) -> usize {
        let stopped: Vec<ActorRef<M>> = {
            let mut slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let keys: Vec<K> = slots.keys().filter(|key| matches(key)).cloned().collect();
            keys.iter().filter_map(|key| slots.remove(key)).filter_map(|slot| slot.get().cloned()).collect()
        };
        for actor in &stopped {
            actor.stop(Some("shard given up".into()));
        }
        stopped.len()
    }
}
