//! The fixed-newstyle handshake: a strict request/response dialogue, written as straight-line
//! code over the socket with a length cap on everything the client sends.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::exports::Exports;
use crate::proto::*;
use crate::volume::BlockVolume;

/// Option payloads above this are refused by closing the connection (no string in the
/// protocol may exceed 4096 bytes; meta-context queries carry a few of them).
const MAX_OPTION_LEN: u32 = 64 << 10;

/// What the client and the server agreed on.
pub(crate) struct Negotiated<V> {
    pub volume: Arc<V>,
    pub export: String,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    /// The client aborted or asked for an export that does not exist via EXPORT_NAME.
    #[error("{0}")]
    Ended(String),
}

/// Everything needed to answer INFO, GO and EXPORT_NAME for one export.
pub(crate) fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN
        | TFLAG_SEND_CACHE
        | TFLAG_SEND_FAST_ZERO;
    if structured {
        f |= TFLAG_SEND_DF;
    }
    if read_only {
        f |= TFLAG_READ_ONLY;
    }
    f
}

struct Session<'a, R, W, V> {
    r: &'a mut R,
    w: &'a mut W,
    exports: &'a Exports<V>,
    structured: bool,
    /// The export and whether base:allocation was selected for it by SET_META_CONTEXT.
    meta: Option<(String, bool)>,
    no_zeroes: bool,
    shutdown: &'a CancellationToken,
}

/// Runs the handshake. Returns `Ok(None)` when the client ended it politely (ABORT).
pub(crate) async fn negotiate<R, W, V>(
    r: &mut R,
    w: &mut W,
    exports: &Exports<V>,
    shutdown: &CancellationToken,
) -> Result<Option<Negotiated<V>>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    V: BlockVolume,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    w.write_all(&greeting).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let mut s = Session {
        r,
        w,
        exports,
        structured: false,
        meta: None,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        shutdown,
    };
    loop {
        let magic = s.r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "option magic {magic:#x} is not IHAVEOPT"
            )));
        }
        let option = s.r.read_u32().await?;
        let len = s.r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::Protocol(format!(
                "option {option} carries {len} bytes (limit {MAX_OPTION_LEN})"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.r.read_exact(&mut data).await?;
        if let Some(end) = s.option(option, &data).await? {
            return Ok(end);
        }
    }
}

/// A cursor over an option's payload that never reads past its end.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<R, W, V> Session<'_, R, W, V>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    V: BlockVolume,
{
    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::with_capacity(20 + data.len());
        b.put_u64(REPLY_OPT_MAGIC);
        b.put_u32(option);
        b.put_u32(kind);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.w.write_all(&b).await?;
        self.w.flush().await
    }

    async fn error(&mut self, option: u32, kind: u32, msg: &str) -> std::io::Result<()> {
        tracing::debug!(option, "option refused: {msg}");
        self.reply(option, kind, msg.as_bytes()).await
    }

    /// Handles one option; `Some` ends the handshake.
    async fn option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Option<Negotiated<V>>>, HandshakeError> {
        if self.shutdown.is_cancelled() && option != OPT_ABORT {
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")
                .await?;
            return Ok(None);
        }
        match option {
            OPT_EXPORT_NAME => return self.export_name(data).await.map(Some),
            OPT_ABORT => {
                // The client may already have closed; that is fine.
                let _ = self.reply(option, REP_ACK, &[]).await;
                return Ok(Some(None));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "LIST takes no data")
                        .await?;
                } else {
                    let names: Vec<String> = self.exports.iter().map(|(n, _)| n.clone()).collect();
                    for name in names {
                        let mut b = BytesMut::new();
                        b.put_u32(name.len() as u32);
                        b.put_slice(name.as_bytes());
                        self.reply(option, REP_SERVER, &b).await?;
                    }
                    self.reply(option, REP_ACK, &[]).await?;
                }
            }
            OPT_STARTTLS => {
                self.error(
                    option,
                    REP_ERR_POLICY,
                    "TLS is not supported by this server",
                )
                .await?
            }
            OPT_INFO | OPT_GO => return self.info_or_go(option, data).await,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                        .await?;
                } else {
                    self.structured = true;
                    self.reply(option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data).await?,
            _ => {
                self.error(option, REP_ERR_UNSUP, "option not supported")
                    .await?
            }
        }
        Ok(None)
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Option<Negotiated<V>>, HandshakeError> {
        let name = String::from_utf8_lossy(data).into_owned();
        let Some(volume) = self.exports.find(&name) else {
            // EXPORT_NAME has no way to report an error but closing.
            return Err(HandshakeError::Ended(format!("unknown export {name:?}")));
        };
        let mut b = BytesMut::with_capacity(134);
        b.put_u64(volume.size());
        b.put_u16(transmission_flags(self.structured, false));
        if !self.no_zeroes {
            b.put_bytes(0, 124);
        }
        self.w.write_all(&b).await?;
        self.w.flush().await?;
        Ok(Some(self.finish(name, volume)))
    }

    fn finish(&mut self, export: String, volume: Arc<V>) -> Negotiated<V> {
        let base_allocation = matches!(&self.meta, Some((e, true)) if *e == export);
        let export = self
            .exports
            .find_named(&export)
            .map_or(export, |(canonical, _)| canonical);
        Negotiated {
            volume,
            export,
            structured: self.structured,
            base_allocation: base_allocation && self.structured,
        }
    }

    async fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Option<Negotiated<V>>>, HandshakeError> {
        let mut p = Payload(data);
        let parsed = (|| {
            let name = p.string()?;
            let n = p.u16()?;
            let infos: Option<Vec<u16>> = (0..n).map(|_| p.u16()).collect();
            p.is_empty().then_some((name, infos?))
        })();
        let Some((name, infos)) = parsed else {
            self.error(option, REP_ERR_INVALID, "malformed INFO/GO request")
                .await?;
            return Ok(None);
        };
        let Some(volume) = self.exports.find(&name) else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            )
            .await?;
            return Ok(None);
        };
        let mut export = BytesMut::new();
        export.put_u16(INFO_EXPORT);
        export.put_u64(volume.size());
        export.put_u16(transmission_flags(self.structured, false));
        self.reply(option, REP_INFO, &export).await?;
        let mut sizes = BytesMut::new();
        sizes.put_u16(INFO_BLOCK_SIZE);
        sizes.put_u32(MIN_BLOCK);
        sizes.put_u32(PREFERRED_BLOCK);
        sizes.put_u32(MAX_PAYLOAD);
        self.reply(option, REP_INFO, &sizes).await?;
        if infos.contains(&INFO_NAME) {
            let mut b = BytesMut::new();
            b.put_u16(INFO_NAME);
            b.put_slice(name.as_bytes());
            self.reply(option, REP_INFO, &b).await?;
        }
        if infos.contains(&INFO_DESCRIPTION) {
            let mut b = BytesMut::new();
            b.put_u16(INFO_DESCRIPTION);
            b.put_slice(b"blockrep volume");
            self.reply(option, REP_INFO, &b).await?;
        }
        self.reply(option, REP_ACK, &[]).await?;
        if option == OPT_GO {
            return Ok(Some(Some(self.finish(name, volume))));
        }
        Ok(None)
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self
                .error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let mut p = Payload(data);
        let parsed = (|| {
            let name = p.string()?;
            let n = p.u32()?;
            let queries: Option<Vec<String>> = (0..n).map(|_| p.string()).collect();
            p.is_empty().then_some((name, queries?))
        })();
        let Some((name, queries)) = parsed else {
            return self
                .error(option, REP_ERR_INVALID, "malformed meta context request")
                .await;
        };
        if self.exports.find(&name).is_none() {
            return self
                .error(
                    option,
                    REP_ERR_UNKNOWN,
                    &format!("no export named {name:?}"),
                )
                .await;
        }
        // LIST with no queries, or with the namespace alone, lists everything we have; SET
        // selects only exact names.
        let selected = queries.iter().any(|q| q == BASE_ALLOCATION)
            || (!set && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
        if selected {
            let mut b = BytesMut::new();
            b.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
            b.put_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &b).await?;
        }
        if set {
            self.meta = Some((name, selected));
        }
        self.reply(option, REP_ACK, &[]).await
    }
}
