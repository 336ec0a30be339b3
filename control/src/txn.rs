//! The etcd operations the core asks for, in etcd's own terms, so a driver maps each to one
//! etcd request with nothing to decide.

/// One key as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// 0 for a key that does not exist (etcd's convention, compared by [`Compare::Absent`]).
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
}

/// A range read of a volume's directory at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub revision: i64,
    pub kvs: Vec<Kv>,
}

/// A transaction's guard. Every guard must hold for the transaction to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist (`create_revision == 0`).
    Absent(String),
    /// The key exists and was last written at this revision.
    ModRevision(String, i64),
    /// The key exists and holds exactly this value.
    Value(String, Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Writes the key; `leased` binds it to this node's lease, so it vanishes when the node
    /// stops renewing.
    Put {
        key: String,
        value: Vec<u8>,
        leased: bool,
    },
    Delete {
        key: String,
    },
}

/// One etcd transaction: if every compare holds, every op is applied, atomically. There is
/// no failure branch: on failure the core waits for the next view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
}

impl Txn {
    pub fn when(mut self, compare: Compare) -> Txn {
        self.compares.push(compare);
        self
    }

    pub fn put(mut self, key: String, value: Vec<u8>) -> Txn {
        self.success.push(Op::Put {
            key,
            value,
            leased: false,
        });
        self
    }

    pub fn put_leased(mut self, key: String, value: Vec<u8>) -> Txn {
        self.success.push(Op::Put {
            key,
            value,
            leased: true,
        });
        self
    }

    pub fn delete(mut self, key: String) -> Txn {
        self.success.push(Op::Delete { key });
        self
    }
}

/// Names one transaction the core asked for, so its result finds its purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(pub u64);
