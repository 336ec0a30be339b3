//! Promoting a replica's store to primary: asks the volume's other members what they hold
//! (the probe), and applies the core's rule ([`crate::core::promotion::check`]) twice: once
//! without disturbing anyone, then again after fencing the members at the new epoch, on what
//! they hold once the old primary can no longer add to it.

use blockrep_storage::{Epoch, VolumeId};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};

use super::tls::{dial, DialError, DialRefused, PeerStream, PeerTls};
use super::{CodecError, FrameCodec, CONNECT_TIMEOUT};
use crate::core::promotion::{self, Facts};
use crate::core::{CommitMode, ReplicaId};
use crate::wire::{Body, Frame};

/// Why a member could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{addr}: timed out")]
    ConnectTimeout { addr: String },
    #[error("{addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Exchange { addr: String, source: CodecError },
    #[error("{addr}: closed without answering")]
    Closed { addr: String },
    #[error("{addr}: no answer")]
    NoAnswer { addr: String },
    #[error("{addr}: {source}")]
    Refused { addr: String, source: DialRefused },
}

/// Asks the store behind `addr` what it holds (used before a promotion). With `fence`, the
/// member first adopts `epoch` on behalf of that candidate store and stops following its
/// current primary.
pub async fn probe(
    addr: &str,
    epoch: Epoch,
    fence: Option<VolumeId>,
) -> Result<(Epoch, Body), ProbeError> {
    probe_member(None, "", addr, epoch, fence).await
}

/// [`probe`], over mutual TLS when `tls` is given: the member at `addr` must then present
/// the certificate of `name`.
pub async fn probe_member(
    tls: Option<&PeerTls>,
    name: &str,
    addr: &str,
    epoch: Epoch,
    fence: Option<VolumeId>,
) -> Result<(Epoch, Body), ProbeError> {
    let addr_owned = || addr.to_string();
    match dial(tls, name, addr, CONNECT_TIMEOUT).await {
        Ok(PeerStream::Plain(s)) => {
            let (r, w) = s.into_split();
            ask(r, w, addr, epoch, fence).await
        }
        Ok(PeerStream::Tls(s)) => {
            let (r, w) = tokio::io::split(*s);
            ask(r, w, addr, epoch, fence).await
        }
        Err(DialError::Timeout) => Err(ProbeError::ConnectTimeout { addr: addr_owned() }),
        Err(DialError::Connect(source)) => Err(ProbeError::Connect {
            addr: addr_owned(),
            source,
        }),
        Err(DialError::Refused(source)) => Err(ProbeError::Refused {
            addr: addr_owned(),
            source,
        }),
    }
}

/// Sends the probe and reads its answer.
async fn ask(
    r: impl AsyncRead + Unpin,
    w: impl AsyncWrite + Unpin,
    addr: &str,
    epoch: Epoch,
    fence: Option<VolumeId>,
) -> Result<(Epoch, Body), ProbeError> {
    let addr_owned = || addr.to_string();
    let mut sink = tokio_util::codec::FramedWrite::new(w, FrameCodec);
    sink.send(Frame {
        epoch,
        body: Body::Probe { fence },
    })
    .await
    .map_err(|source| ProbeError::Exchange {
        addr: addr_owned(),
        source,
    })?;
    let mut frames = tokio_util::codec::FramedRead::new(r, FrameCodec);
    match tokio::time::timeout(CONNECT_TIMEOUT, frames.next()).await {
        Ok(Some(Ok(frame))) => Ok((frame.epoch, frame.body)),
        Ok(Some(Err(source))) => Err(ProbeError::Exchange {
            addr: addr_owned(),
            source,
        }),
        Ok(None) => Err(ProbeError::Closed { addr: addr_owned() }),
        Err(_) => Err(ProbeError::NoAnswer { addr: addr_owned() }),
    }
}

/// Why a store was not promoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromotionError {
    /// The epoch asked for is not above every epoch the volume has seen.
    #[error("epoch {requested} is not above epoch {seen} that this volume has already seen")]
    EpochNotAbove { requested: Epoch, seen: Epoch },
    /// The rule refused (and the promotion was not forced).
    #[error("refusing to promote {candidate}: {why}")]
    Refused { candidate: String, why: String },
}

/// A promotion to decide: the candidate store and the members it replicates to.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// What the candidate holds; its `epoch` is the newest it has seen.
    pub candidate: Facts,
    pub store_id: VolumeId,
    pub volume_id: VolumeId,
    /// The candidate's replicas, by name and address.
    pub replicas: Vec<(ReplicaId, String)>,
    /// At least this many copies (the candidate included) count toward sync-quorum's
    /// majority, however few replicas are listed: the copies the previous term counted.
    pub copies: usize,
    pub mode: CommitMode,
    /// Serve at this epoch rather than the next one.
    pub epoch: Option<Epoch>,
    /// Promote even if the rule refuses (logged loudly).
    pub force: bool,
    /// The in-sync set, when etcd elected the candidate from outside it under sync-all or
    /// best-effort: a member of it must vouch for the candidate ([`promotion::vouched`]).
    pub vouchers: Vec<String>,
    /// Probe the members over mutual TLS (each must present its name's certificate).
    pub tls: Option<PeerTls>,
}

impl Promotion {
    /// Decides the promotion and fences the members: the epoch to serve at.
    pub async fn run(&self) -> Result<Epoch, PromotionError> {
        // First look without disturbing anyone: a promotion that cannot pass leaves the
        // running primary alone.
        let members = self.probe_members(self.candidate.epoch, None).await;
        self.decide(&members)?;
        let min = promotion::next_epoch(&self.candidate, &members);
        let epoch = match self.epoch {
            Some(requested) if requested < min => {
                return Err(PromotionError::EpochNotAbove {
                    requested,
                    seen: Epoch(min.0 - 1),
                })
            }
            Some(e) => e,
            None => min,
        };
        let fenced = self.probe_members(epoch, Some(self.store_id)).await;
        self.decide(&fenced)?;
        Ok(epoch)
    }

    /// Probes every configured replica; those that answer for our volume are the members.
    async fn probe_members(&self, epoch: Epoch, fence: Option<VolumeId>) -> Vec<Facts> {
        let mut members = Vec::new();
        for (id, addr) in &self.replicas {
            match probe_member(self.tls.as_ref(), &id.0, addr, epoch, fence).await {
                Ok((
                    epoch,
                    Body::ProbeReply {
                        volume_id,
                        head,
                        head_epoch,
                        committed,
                        needs_rebuild,
                        ..
                    },
                )) if volume_id == self.volume_id => members.push(Facts {
                    name: id.0.clone(),
                    head,
                    head_epoch,
                    committed,
                    epoch,
                    needs_rebuild,
                    owns_epoch: false,
                }),
                Ok((_, Body::ProbeReply { volume_id, .. })) => {
                    tracing::warn!(replica = %id, "belongs to volume {volume_id}, not ours; ignored")
                }
                Ok((_, Body::Reject { message, .. })) => {
                    tracing::warn!(replica = %id, "refused the promotion probe: {message}")
                }
                Ok((_, other)) => {
                    tracing::warn!(replica = %id, "answered the probe with {}", other.name())
                }
                Err(e) => {
                    tracing::warn!(replica = %id, "unreachable for the promotion check: {e}")
                }
            }
        }
        members
    }

    fn decide(&self, members: &[Facts]) -> Result<(), PromotionError> {
        let me = &self.candidate;
        let configured = self.replicas.len().max(self.copies.saturating_sub(1));
        let verdict = promotion::check(me, members, configured, self.mode)
            .and_then(|()| promotion::vouched(me, members, &self.vouchers));
        match verdict {
            Ok(()) => tracing::info!(
                "promoting {} (head {}, committed {}) with {} of {} replica(s) consulted",
                me.name,
                me.head,
                me.committed,
                members.len(),
                self.replicas.len()
            ),
            Err(why) if self.force => {
                tracing::warn!("FORCED promotion of {}: {why}", me.name)
            }
            Err(why) => {
                return Err(PromotionError::Refused {
                    candidate: me.name.clone(),
                    why,
                })
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockrep_storage::Lsn;

    fn lone(mode: CommitMode, copies: usize) -> Promotion {
        Promotion {
            candidate: Facts {
                name: "b".into(),
                head: Lsn(10),
                head_epoch: Epoch(1),
                committed: Lsn(10),
                epoch: Epoch(1),
                needs_rebuild: false,
                owns_epoch: false,
            },
            store_id: VolumeId([2; 16]),
            volume_id: VolumeId([1; 16]),
            replicas: Vec::new(),
            copies,
            mode,
            epoch: None,
            force: false,
            vouchers: Vec::new(),
            tls: None,
        }
    }

    /// The lone survivor of a three-copy sync-quorum term may lack a write the two others
    /// acknowledged: with the previous term's three copies it is refused; with none given
    /// (a static `serve` alone) it is not.
    #[test]
    fn a_lone_survivor_counts_the_previous_terms_copies() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let refused = rt.block_on(lone(CommitMode::SyncQuorum, 3).run());
        assert!(
            matches!(&refused, Err(PromotionError::Refused { .. })),
            "{refused:?}"
        );
        assert_eq!(
            rt.block_on(lone(CommitMode::SyncQuorum, 0).run()).ok(),
            Some(Epoch(2))
        );
        assert_eq!(
            rt.block_on(lone(CommitMode::SyncAll, 3).run()).ok(),
            Some(Epoch(2))
        );
    }

    /// A candidate etcd elected from outside the in-sync set serves only if a member of the
    /// set answers for it: with none reachable it is refused, even under sync-all, where a
    /// lone candidate from the set is promoted.
    #[test]
    fn a_candidate_from_outside_the_in_sync_set_holds_what_a_member_of_it_holds() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut outside = lone(CommitMode::SyncAll, 3);
        outside.vouchers = vec!["a".into(), "c".into()];
        let refused = rt.block_on(outside.run());
        assert!(
            matches!(&refused, Err(PromotionError::Refused { why, .. }) if why.contains("outside the in-sync set")),
            "{refused:?}"
        );
    }
}
