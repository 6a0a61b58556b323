//! Locks by key: made on first use, forgotten once nobody holds or waits for one and its value is back to
//! its default. They order the subscription changes of one conversation, queue or agent without making
//! unrelated keys wait for each other (a subscription may wait seconds for a shard to move): the gateway's
//! own, and, in the split gateway's cluster client, those it makes again after an owner move.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

pub struct KeyedLocks<K, V> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<V>>>>,
}

impl<K, V> Default for KeyedLocks<K, V> {
    fn default() -> Self {
        KeyedLocks { locks: Mutex::default() }
    }
}

impl<K: Eq + Hash + Clone, V: Default + PartialEq> KeyedLocks<K, V> {
    /// Waits for the lock of `key`; its value is what the last holder left (the default at first).
    pub async fn lock(&self, key: &K) -> KeyedGuard<'_, K, V> {
        let entry = self.map().entry(key.clone()).or_default().clone();
        let guard = entry.clone().lock_owned().await;
        KeyedGuard { locks: self, key: key.clone(), entry, guard: Some(guard) }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, Arc<tokio::sync::Mutex<V>>>> {
        self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

pub struct KeyedGuard<'a, K: Eq + Hash + Clone, V: Default + PartialEq> {
    locks: &'a KeyedLocks<K, V>,
    key: K,
    entry: Arc<tokio::sync::Mutex<V>>,
    guard: Option<OwnedMutexGuard<V>>,
}

impl<K: Eq + Hash + Clone, V: Default + PartialEq> Deref for KeyedGuard<'_, K, V> {
    type Target = V;

    fn deref(&self) -> &V {
        self.guard.as_deref().expect("held until dropped")
    }
}

impl<K: Eq + Hash + Clone, V: Default + PartialEq> DerefMut for KeyedGuard<'_, K, V> {
    fn deref_mut(&mut self) -> &mut V {
        self.guard.as_deref_mut().expect("held until dropped")
    }
}

impl<K: Eq + Hash + Clone, V: Default + PartialEq> Drop for KeyedGuard<'_, K, V> {
    fn drop(&mut self) {
        let idle = self.guard.as_deref().is_some_and(|value| *value == V::default());
        drop(self.guard.take());
        if idle {
            // Forgotten when nobody else holds or waits for it (the map and this guard hold the only two).
            let mut map = self.locks.map();
            if map
                .get(&self.key)
                .is_some_and(|held| Arc::ptr_eq(held, &self.entry) && Arc::strong_count(&self.entry) == 2)
            {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_is_forgotten_when_idle_and_kept_while_its_value_matters() {
        let locks: KeyedLocks<u32, bool> = KeyedLocks::default();
        {
            let mut held = locks.lock(&1).await;
            assert!(!*held);
            *held = true;
        }
        assert_eq!(locks.len(), 1, "a lock whose value is not the default is kept");
        assert!(*locks.lock(&1).await, "the next holder sees the value left");
        {
            let mut held = locks.lock(&1).await;
            *held = false;
        }
        assert_eq!(locks.len(), 0, "back to the default and nobody waiting: forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_waits_for_its_holder_and_other_keys_do_not() {
        let locks: Arc<KeyedLocks<u32, ()>> = Arc::new(KeyedLocks::default());
        let held = locks.lock(&1).await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(1), locks.lock(&2)).await;
        assert!(other.is_ok(), "another key is not held up");
        drop(other);
        let waiter = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _held = locks.lock(&1).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the same key waits for its holder");
        drop(held);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
