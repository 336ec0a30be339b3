//! The exports a server offers, by name: shared by the handshake (which looks names up) and
//! the server (which holds them), so neither has to import the other.

use std::sync::Arc;

/// The exports a server offers, by name. The empty name selects the first one.
pub struct Exports<V> {
    list: Vec<(String, Arc<V>)>,
}

impl<V> Exports<V> {
    pub fn new() -> Exports<V> {
        Exports { list: Vec::new() }
    }

    pub fn add(&mut self, name: impl Into<String>, volume: Arc<V>) {
        self.list.push((name.into(), volume));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &(String, Arc<V>)> {
        self.list.iter()
    }

    pub(crate) fn find(&self, name: &str) -> Option<Arc<V>> {
        self.find_named(name).map(|(_, v)| v)
    }

    /// The export `name` selects, with its canonical name (the empty name is the first).
    pub(crate) fn find_named(&self, name: &str) -> Option<(String, Arc<V>)> {
        let found = if name.is_empty() {
            self.list.first()
        } else {
            self.list.iter().find(|(n, _)| n == name)
        };
        found.map(|(n, v)| (n.clone(), v.clone()))
    }
}

impl<V> Default for Exports<V> {
    fn default() -> Self {
        Exports::new()
    }
}
