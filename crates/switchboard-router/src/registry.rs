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

/// One use of a key's slot. When the last use of a slot ends without an actor in it (every activation
/// failed: no such conversation, the store out of reach; or the uses were dropped midway), the slot is
/// forgotten: the ids a client sends, unknown ones included, would otherwise each keep an entry for good.
/// Each use lets go of its own reference under the lock before it counts the others', so the last one out
/// always sees itself alone.
struct SlotUse<'a, K: Eq + Hash + Clone, M: Message> {
    registry: &'a Registry<K, M>,
    key: &'a K,
    slot: Option<Slot<M>>,
}

impl<K: Eq + Hash + Clone, M: Message> Drop for SlotUse<'_, K, M> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        if slot.initialized() {
            return;
        }
        let mut slots = self.registry.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mine = slots.get(self.key).is_some_and(|current| Arc::ptr_eq(current, &slot));
        drop(slot);
        let unused = |current: &Slot<M>| Arc::strong_count(current) == 1 && !current.initialized();
        if mine && slots.get(self.key).is_some_and(unused) {
            slots.remove(self.key);
        }
    }
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
        let slot_use = SlotUse { registry: self, key, slot: Some(self.slot(key)) };
        let slot = slot_use.slot.as_ref().expect("set above");
        // Found running (every use but the first): it was registered when `slot` read it, and nothing is
        // activated here, so the check below, which takes the lock again, is only for activations.
        if let Some(actor) = slot.get() {
            return Ok(actor.clone());
        }
        let actor = slot.get_or_try_init(activate).await?.clone();
        // The key's shard given up while the actor was being activated (`stop_where` found the slot empty and
        // forgot it): the actor would live on unknown to the registry, beside the new owner's. Stopped too.
        let registered = {
            let slots = self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            slots.get(key).is_some_and(|current| Arc::ptr_eq(current, slot))
        };
        if !registered {
            actor.stop(Some("shard given up during its activation".into()));
            return Err(RouterError::NotOwner);
        }
        Ok(actor)
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

#[cfg(test)]
mod tests {
    use ractor::{Actor, ActorProcessingErr};

    use super::*;

    struct Idle;

    impl Actor for Idle {
        type Msg = ();
        type State = ();
        type Arguments = ();

        async fn pre_start(&self, _: ActorRef<()>, _: ()) -> Result<(), ActorProcessingErr> {
            Ok(())
        }
    }

    fn keys(registry: &Registry<u32, ()>) -> usize {
        registry.slots.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_key_whose_activation_fails_is_not_kept() {
        let registry: Registry<u32, ()> = Registry::default();
        for key in 0..100 {
            let failed = registry.get_or_activate(&key, || async { Err(RouterError::NotFound) }).await;
            assert_eq!(failed.err(), Some(RouterError::NotFound));
        }
        assert_eq!(keys(&registry), 0, "unknown ids leave nothing behind");
    }

    #[tokio::test]
    async fn a_key_whose_only_use_was_dropped_during_its_activation_is_not_kept() {
        let registry: Arc<Registry<u32, ()>> = Arc::default();
        let using = tokio::spawn({
            let registry = registry.clone();
            async move { registry.get_or_activate(&7, std::future::pending).await }
        });
        while keys(&registry) == 0 {
            tokio::task::yield_now().await;
        }
        // The caller went away (a client's request dropped with its connection).
        using.abort();
        assert!(using.await.unwrap_err().is_cancelled());
        assert_eq!(keys(&registry), 0);
    }

    #[tokio::test]
    async fn a_use_waiting_on_an_activation_that_fails_activates_the_key_itself() {
        let registry: Arc<Registry<u32, ()>> = Arc::default();
        let (go, failing) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let registry = registry.clone();
            async move {
                registry
                    .get_or_activate(&7, || async move {
                        let _ = failing.await;
                        Err(RouterError::Unavailable("the store".into()))
                    })
                    .await
            }
        });
        // The second use finds the first one's activation under way, and waits on it.
        while keys(&registry) == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let registry = registry.clone();
            async move { registry.get_or_activate(&7, || async { Ok(Actor::spawn(None, Idle, ()).await.unwrap().0) }).await }
        });
        // (Held by the map, the first use and the second.)
        while registry.slots.lock().unwrap().get(&7).is_none_or(|slot| Arc::strong_count(slot) < 3) {
            tokio::task::yield_now().await;
        }
        drop(go);
        assert!(first.await.unwrap().is_err());
        let actor = second.await.unwrap().expect("activated by the second use, and registered");
        assert!(registry.get_running(&7).is_some_and(|running| running.get_id() == actor.get_id()));
        assert_eq!(keys(&registry), 1);
    }

    #[tokio::test]
    async fn an_actor_whose_shard_is_given_up_while_it_is_activated_is_stopped_not_left_running() {
        let registry: Arc<Registry<u32, ()>> = Arc::default();
        let (activating, activated) = tokio::sync::oneshot::channel::<()>();
        let (spawned, spawned_actor) = tokio::sync::oneshot::channel();
        let first = tokio::spawn({
            let registry = registry.clone();
            async move {
                registry
                    .get_or_activate(&7, || async move {
                        let (actor, _) = Actor::spawn(None, Idle, ()).await.unwrap();
                        let _ = spawned.send(actor.clone());
                        let _ = activated.await;
                        Ok(actor)
                    })
                    .await
            }
        });
        let actor = spawned_actor.await.unwrap();
        // The shard is given up while the activation reads its state.
        assert_eq!(registry.stop_where(|key| *key == 7), 0, "nothing running to stop yet");
        drop(activating);
        assert_eq!(first.await.unwrap().err(), Some(RouterError::NotOwner));
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while is_alive(&actor) {
                tokio::task::yield_now().await;
            }
        });
        assert!(stopped.await.is_ok(), "the actor is stopped");
        assert!(registry.get_running(&7).is_none());
        // Owned again later, the key is activated afresh.
        let again = registry.get_or_activate(&7, || async { Ok(Actor::spawn(None, Idle, ()).await.unwrap().0) }).await;
        assert!(again.is_ok_and(|fresh| fresh.get_id() != actor.get_id() && is_alive(&fresh)));
    }
}
