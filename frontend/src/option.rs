//! Handshake options decoded once into typed requests.
//!
//! [`ClientOption::parse`] reads an option's payload (already length-capped and read in full
//! by the handshake) into what the option asks for, or into the [`Malformed`] reason the
//! server answers with `NBD_REP_ERR_INVALID`. It never reads past the payload. Whether an
//! option is allowed *now* (shutdown, SET_META_CONTEXT before STRUCTURED_REPLY, an unknown
//! export) depends on the session and is decided by the handshake, not here.

use crate::proto::*;

/// One option as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientOption {
    /// The whole payload is the name (not length-prefixed; invalid UTF-8 is replaced).
    ExportName(String),
    Abort,
    List(Result<(), Malformed>),
    StartTls(Result<(), Malformed>),
    Info(Result<InfoRequest, Malformed>),
    Go(Result<InfoRequest, Malformed>),
    StructuredReply(Result<(), Malformed>),
    ListMetaContext(Result<MetaQuery, Malformed>),
    SetMetaContext(Result<MetaQuery, Malformed>),
    Unknown,
}

/// The payload of INFO and GO: an export and the information items asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// The payload of LIST_META_CONTEXT and SET_META_CONTEXT: an export and context queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaQuery {
    pub name: String,
    pub queries: Vec<String>,
}

/// An option payload that does not have the shape its option requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("LIST takes no data")]
    ListData,
    #[error("STRUCTURED_REPLY takes no data")]
    StructuredReplyData,
    #[error("STARTTLS takes no data")]
    StartTlsData,
    #[error("malformed INFO/GO request")]
    InfoGo,
    #[error("malformed meta context request")]
    MetaContext,
}

impl ClientOption {
    pub(crate) fn parse(option: u32, data: &[u8]) -> ClientOption {
        let empty = |reason: Malformed| if data.is_empty() { Ok(()) } else { Err(reason) };
        match option {
            OPT_EXPORT_NAME => ClientOption::ExportName(String::from_utf8_lossy(data).into_owned()),
            OPT_ABORT => ClientOption::Abort,
            OPT_LIST => ClientOption::List(empty(Malformed::ListData)),
            OPT_STARTTLS => ClientOption::StartTls(empty(Malformed::StartTlsData)),
            OPT_INFO => ClientOption::Info(InfoRequest::parse(data)),
            OPT_GO => ClientOption::Go(InfoRequest::parse(data)),
            OPT_STRUCTURED_REPLY => {
                ClientOption::StructuredReply(empty(Malformed::StructuredReplyData))
            }
            OPT_LIST_META_CONTEXT => ClientOption::ListMetaContext(MetaQuery::parse(data)),
            OPT_SET_META_CONTEXT => ClientOption::SetMetaContext(MetaQuery::parse(data)),
            _ => ClientOption::Unknown,
        }
    }
}

impl InfoRequest {
    fn parse(data: &[u8]) -> Result<InfoRequest, Malformed> {
        let parsed = name_and_items(data, |p| p.u16().map(u32::from), Payload::u16);
        let (name, infos) = parsed.ok_or(Malformed::InfoGo)?;
        Ok(InfoRequest { name, infos })
    }
}

impl MetaQuery {
    fn parse(data: &[u8]) -> Result<MetaQuery, Malformed> {
        let parsed = name_and_items(data, Payload::u32, Payload::string);
        let (name, queries) = parsed.ok_or(Malformed::MetaContext)?;
        Ok(MetaQuery { name, queries })
    }
}

/// The layout INFO, GO and both META_CONTEXT options share: a length-prefixed export name,
/// a count, that many items, and nothing after them.
fn name_and_items<'a, T>(
    data: &'a [u8],
    count: impl FnOnce(&mut Payload<'a>) -> Option<u32>,
    mut item: impl FnMut(&mut Payload<'a>) -> Option<T>,
) -> Option<(String, Vec<T>)> {
    let mut p = Payload(data);
    let name = p.string()?;
    let n = count(&mut p)?;
    let items = (0..n).map(|_| item(&mut p)).collect::<Option<Vec<T>>>()?;
    p.is_empty().then_some((name, items))
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
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn info_and_go_decode_name_and_items_and_refuse_leftovers() {
        let mut data = Vec::new();
        string(&mut data, "disk");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
        let want = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_NAME, INFO_DESCRIPTION],
        };
        assert_eq!(
            ClientOption::parse(OPT_GO, &data),
            ClientOption::Go(Ok(want.clone()))
        );
        assert_eq!(
            ClientOption::parse(OPT_INFO, &data),
            ClientOption::Info(Ok(want))
        );
        data.push(0);
        assert_eq!(
            ClientOption::parse(OPT_GO, &data),
            ClientOption::Go(Err(Malformed::InfoGo))
        );
        // A name longer than the payload.
        assert_eq!(
            ClientOption::parse(OPT_INFO, &[0, 0, 0, 9, b'a']),
            ClientOption::Info(Err(Malformed::InfoGo))
        );
    }

    #[test]
    fn meta_context_queries_decode_and_truncation_is_malformed() {
        let mut data = Vec::new();
        string(&mut data, "");
        data.extend_from_slice(&2u32.to_be_bytes());
        string(&mut data, BASE_ALLOCATION);
        string(&mut data, "base:");
        let want = MetaQuery {
            name: String::new(),
            queries: vec![BASE_ALLOCATION.into(), "base:".into()],
        };
        assert_eq!(
            ClientOption::parse(OPT_SET_META_CONTEXT, &data),
            ClientOption::SetMetaContext(Ok(want))
        );
        data.pop();
        assert_eq!(
            ClientOption::parse(OPT_LIST_META_CONTEXT, &data),
            ClientOption::ListMetaContext(Err(Malformed::MetaContext))
        );
    }

    #[test]
    fn options_without_data_refuse_data_and_unknown_options_are_unknown() {
        assert_eq!(
            ClientOption::parse(OPT_LIST, &[]),
            ClientOption::List(Ok(()))
        );
        assert_eq!(
            ClientOption::parse(OPT_LIST, &[1]),
            ClientOption::List(Err(Malformed::ListData))
        );
        assert_eq!(
            ClientOption::parse(OPT_STARTTLS, &[]),
            ClientOption::StartTls(Ok(()))
        );
        assert_eq!(
            ClientOption::parse(OPT_STARTTLS, &[0]),
            ClientOption::StartTls(Err(Malformed::StartTlsData))
        );
        assert_eq!(
            ClientOption::parse(OPT_STRUCTURED_REPLY, &[1]),
            ClientOption::StructuredReply(Err(Malformed::StructuredReplyData))
        );
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, b"a\xffb"),
            ClientOption::ExportName("a\u{fffd}b".into())
        );
        assert_eq!(ClientOption::parse(4, &[]), ClientOption::Unknown);
        assert_eq!(ClientOption::parse(u32::MAX, &[9]), ClientOption::Unknown);
    }
}
