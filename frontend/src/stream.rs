//! A client's byte stream: a plain TCP or Unix socket, or TLS over one after STARTTLS.
//!
//! The handshake reads this stream directly, with no buffer in between: every byte it takes
//! is one an option asked for. So when STARTTLS is acknowledged nothing the client sent
//! after it has been read yet, and the TLS handshake reads it as TLS records (plaintext
//! smuggled in after STARTTLS breaks the handshake instead of being obeyed inside TLS).
//! Only once the handshake is over does [`Stream::into_split`] hand the stream to the
//! transmission phase, which may buffer freely.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// An accepted socket, before any TLS.
pub(crate) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// What the handshake and the transmission phase speak over.
pub(crate) enum Stream {
    Plain(Plain),
    Tls(Box<TlsStream<Plain>>),
}

pub(crate) type Reader = Box<dyn AsyncRead + Unpin + Send>;
pub(crate) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

impl Stream {
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Runs the TLS handshake on a plain stream. A stream already in TLS is refused: there
    /// is no second upgrade and no way back.
    pub(crate) async fn upgrade(self, acceptor: &TlsAcceptor) -> io::Result<Stream> {
        match self {
            Stream::Plain(plain) => Ok(Stream::Tls(Box::new(acceptor.accept(plain).await?))),
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the connection is already in TLS",
            )),
        }
    }

    /// The two halves the transmission phase reads and writes concurrently. A plain socket
    /// splits without a lock; TLS shares one session between the halves.
    pub(crate) fn into_split(self) -> (Reader, Writer) {
        match self {
            Stream::Plain(Plain::Tcp(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Plain(Plain::Unix(s)) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// `AsyncRead` and `AsyncWrite` for an enum of streams, each call forwarded to whichever
/// variant this is (one definition for both enums, so the two cannot drift apart).
macro_rules! forward_io {
    ($ty:ident: $($variant:ident),+) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_write(cx, buf),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

forward_io!(Plain: Tcp, Unix);
forward_io!(Stream: Plain, Tls);
