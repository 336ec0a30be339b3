//! The fixed-newstyle handshake: a strict request/response dialogue, written as straight-line
//! code over the socket with a length cap on everything the client sends. Each option is
//! decoded once into a [`ClientOption`] and answered by a method of its own.
//!
//! STARTTLS splits the handshake in two: what was negotiated lives in a [`Session`], and a
//! session never outlives the stream it was made on. After the upgrade a fresh session
//! starts on the TLS stream, so nothing agreed in plaintext (structured replies, meta
//! contexts) carries over, and whether the stream is in TLS is read off the stream itself.

use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::exports::Exports;
use crate::option::{ClientOption, InfoRequest, Malformed, MetaQuery};
use crate::proto::*;
use crate::stream::{Plain, Stream};
use crate::tls::Tls;
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
    /// EXPORT_NAME named an export that does not exist (it has no answer but closing).
    #[error("{0}")]
    Ended(String),
    /// The TLS handshake after STARTTLS failed (which ends the session, as the spec says).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

/// The transmission flags INFO, GO and EXPORT_NAME advertise for an export.
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

/// One stretch of option negotiation on one stream: everything here is forgotten at STARTTLS.
struct Session<'a, V> {
    stream: &'a mut Stream,
    exports: &'a Exports<V>,
    tls: &'a Tls,
    structured: bool,
    /// The export and whether base:allocation was selected for it by SET_META_CONTEXT.
    meta: Option<(String, bool)>,
    /// From the client flags, which come before any option and so survive STARTTLS.
    no_zeroes: bool,
    shutdown: &'a CancellationToken,
}

/// What one option did to the handshake.
enum Outcome<V> {
    /// The session goes on with the next option.
    Next,
    /// The session is over.
    Done(End<V>),
}

/// How a session ended.
enum End<V> {
    /// Transmission starts with what was agreed.
    Transmit(Negotiated<V>),
    /// The client ended the handshake politely (ABORT).
    Aborted,
    /// STARTTLS was acknowledged: the TLS handshake comes next, then a fresh session.
    StartTls(TlsAcceptor),
}

/// Runs the handshake. Returns the stream transmission goes on (TLS after STARTTLS) with
/// what was agreed, or `Ok(None)` when the client ended it politely (ABORT).
pub(crate) async fn negotiate<V: BlockVolume>(
    plain: Plain,
    exports: &Exports<V>,
    shutdown: &CancellationToken,
    tls: &Tls,
) -> Result<Option<(Stream, Negotiated<V>)>, HandshakeError> {
    let mut stream = Stream::Plain(plain);
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    stream.flush().await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    loop {
        let session = Session {
            stream: &mut stream,
            exports,
            tls,
            structured: false,
            meta: None,
            no_zeroes,
            shutdown,
        };
        match session.run().await? {
            End::Transmit(negotiated) => return Ok(Some((stream, negotiated))),
            End::Aborted => return Ok(None),
            End::StartTls(acceptor) => {
                stream = stream
                    .upgrade(&acceptor)
                    .await
                    .map_err(HandshakeError::Tls)?;
            }
        }
    }
}

impl<V: BlockVolume> Session<'_, V> {
    /// Answers options until one ends this session (GO, EXPORT_NAME, ABORT or STARTTLS).
    async fn run(mut self) -> Result<End<V>, HandshakeError> {
        loop {
            let magic = self.stream.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(HandshakeError::Protocol(format!(
                    "option magic {magic:#x} is not IHAVEOPT"
                )));
            }
            let option = self.stream.read_u32().await?;
            let len = self.stream.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(HandshakeError::Protocol(format!(
                    "option {option} carries {len} bytes (limit {MAX_OPTION_LEN})"
                )));
            }
            let mut data = vec![0u8; len as usize];
            self.stream.read_exact(&mut data).await?;
            if let Outcome::Done(end) = self.option(option, &data).await? {
                return Ok(end);
            }
        }
    }

    async fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::with_capacity(20 + data.len());
        b.put_u64(REPLY_OPT_MAGIC);
        b.put_u32(option);
        b.put_u32(kind);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.stream.write_all(&b).await?;
        self.stream.flush().await
    }

    async fn error(&mut self, option: u32, kind: u32, msg: &str) -> std::io::Result<()> {
        tracing::debug!(option, "option refused: {msg}");
        self.reply(option, kind, msg.as_bytes()).await
    }

    async fn invalid(&mut self, option: u32, why: Malformed) -> std::io::Result<()> {
        self.error(option, REP_ERR_INVALID, &why.to_string()).await
    }

    /// Answers one option. During a shutdown every option but ABORT is refused; on a
    /// TLS-only server still in plaintext, every option but STARTTLS and ABORT.
    async fn option(&mut self, option: u32, data: &[u8]) -> Result<Outcome<V>, HandshakeError> {
        let parsed = ClientOption::parse(option, data);
        if self.shutdown.is_cancelled() && parsed != ClientOption::Abort {
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down")
                .await?;
            return Ok(Outcome::Next);
        }
        let before_tls = self.tls.required() && !self.stream.is_tls();
        match parsed {
            ClientOption::Abort => return Ok(self.abort(option).await),
            ClientOption::StartTls(request) => return self.start_tls(option, request).await,
            // EXPORT_NAME has no error reply: the spec's answer is to hang up.
            ClientOption::ExportName(_) if before_tls => {
                return Err(HandshakeError::Ended(
                    "EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                ))
            }
            _ if before_tls => {
                self.error(
                    option,
                    REP_ERR_TLS_REQD,
                    "this server requires TLS: send STARTTLS first",
                )
                .await?
            }
            ClientOption::ExportName(name) => return self.export_name(name).await,
            ClientOption::Info(request) => return self.info_or_go(option, request, false).await,
            ClientOption::Go(request) => return self.info_or_go(option, request, true).await,
            ClientOption::List(Ok(())) => self.list(option).await?,
            ClientOption::StructuredReply(Ok(())) => self.structured_reply(option).await?,
            ClientOption::List(Err(why)) | ClientOption::StructuredReply(Err(why)) => {
                self.invalid(option, why).await?
            }
            ClientOption::ListMetaContext(query) => self.meta_context(option, false, query).await?,
            ClientOption::SetMetaContext(query) => self.meta_context(option, true, query).await?,
            ClientOption::Unknown => {
                self.error(option, REP_ERR_UNSUP, "option not supported")
                    .await?
            }
        }
        Ok(Outcome::Next)
    }

    /// STARTTLS: acknowledged in plaintext, then the TLS handshake (by the caller, which
    /// starts a fresh session on the TLS stream). Refused with TLS off, and inside TLS:
    /// there is no second upgrade and no downgrade.
    async fn start_tls(
        &mut self,
        option: u32,
        request: Result<(), Malformed>,
    ) -> Result<Outcome<V>, HandshakeError> {
        let accepted = match (self.tls.acceptor(), request) {
            (None, _) => Err((REP_ERR_POLICY, "TLS is not enabled on this server".into())),
            (Some(_), _) if self.stream.is_tls() => {
                Err((REP_ERR_INVALID, "TLS is already active".into()))
            }
            (Some(_), Err(why)) => Err((REP_ERR_INVALID, why.to_string())),
            (Some(acceptor), Ok(())) => Ok(acceptor.clone()),
        };
        let acceptor = match accepted {
            Ok(acceptor) => acceptor,
            Err((kind, msg)) => {
                self.error(option, kind, &msg).await?;
                return Ok(Outcome::Next);
            }
        };
        self.reply(option, REP_ACK, &[]).await?;
        Ok(Outcome::Done(End::StartTls(acceptor)))
    }

    async fn abort(&mut self, option: u32) -> Outcome<V> {
        // The client may already have closed; that is fine.
        let _ = self.reply(option, REP_ACK, &[]).await;
        Outcome::Done(End::Aborted)
    }

    async fn list(&mut self, option: u32) -> std::io::Result<()> {
        let names: Vec<String> = self.exports.iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            let mut b = BytesMut::new();
            b.put_u32(name.len() as u32);
            b.put_slice(name.as_bytes());
            self.reply(option, REP_SERVER, &b).await?;
        }
        self.reply(option, REP_ACK, &[]).await
    }

    async fn structured_reply(&mut self, option: u32) -> std::io::Result<()> {
        self.structured = true;
        self.reply(option, REP_ACK, &[]).await
    }

    async fn export_name(&mut self, name: String) -> Result<Outcome<V>, HandshakeError> {
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
        self.stream.write_all(&b).await?;
        self.stream.flush().await?;
        Ok(Outcome::Done(End::Transmit(self.finish(name, volume))))
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
        request: Result<InfoRequest, Malformed>,
        go: bool,
    ) -> Result<Outcome<V>, HandshakeError> {
        let InfoRequest { name, infos } = match request {
            Ok(request) => request,
            Err(why) => {
                self.invalid(option, why).await?;
                return Ok(Outcome::Next);
            }
        };
        let Some(volume) = self.exports.find(&name) else {
            self.error(
                option,
                REP_ERR_UNKNOWN,
                &format!("no export named {name:?}"),
            )
            .await?;
            return Ok(Outcome::Next);
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
            self.info_text(option, INFO_NAME, name.as_bytes()).await?;
        }
        if infos.contains(&INFO_DESCRIPTION) {
            self.info_text(option, INFO_DESCRIPTION, b"blockrep volume")
                .await?;
        }
        self.reply(option, REP_ACK, &[]).await?;
        if go {
            return Ok(Outcome::Done(End::Transmit(self.finish(name, volume))));
        }
        Ok(Outcome::Next)
    }

    async fn info_text(&mut self, option: u32, info: u16, text: &[u8]) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        b.put_u16(info);
        b.put_slice(text);
        self.reply(option, REP_INFO, &b).await
    }

    async fn meta_context(
        &mut self,
        option: u32,
        set: bool,
        query: Result<MetaQuery, Malformed>,
    ) -> std::io::Result<()> {
        if set && !self.structured {
            return self
                .error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let MetaQuery { name, queries } = match query {
            Ok(query) => query,
            Err(why) => return self.invalid(option, why).await,
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

#[cfg(test)]
mod tests;
