//! GnuTLS's certtool writes an EC private key's scalar the way DER writes an INTEGER: with a
//! 0x00 in front whenever its top bit is set (33 bytes for P-256, 49 for P-384), where SEC1
//! (RFC 5915) says the octet string is exactly the field size. ring refuses such a key, so
//! about half of certtool's ECDSA keys would not load; [`strip_scalar_padding`] repairs them.

/// The key with its scalar's leading zero removed, or `None` when there is nothing to
/// repair (or it is not the SEC1 shape: the loader then reports what ring says).
pub(crate) fn strip_scalar_padding(der: &[u8]) -> Option<Vec<u8>> {
    let (tag, body, rest) = element(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (version_tag, version, after_version) = element(body)?;
    if version_tag != 0x02 || version != [1] {
        return None;
    }
    let (scalar_tag, scalar, after_scalar) = element(after_version)?;
    if scalar_tag != 0x04 || !matches!(scalar.len(), 33 | 49) || scalar[0] != 0 {
        return None;
    }
    let mut inner = vec![0x02, 0x01, 0x01];
    push_element(&mut inner, 0x04, &scalar[1..]);
    inner.extend_from_slice(after_scalar);
    let mut out = Vec::with_capacity(inner.len() + 4);
    push_element(&mut out, 0x30, &inner);
    Some(out)
}

/// One DER element: its tag, its contents and what follows it.
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, der) = der.split_first()?;
    let (&first, der) = der.split_first()?;
    let (len, der) = if first < 0x80 {
        (usize::from(first), der)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 2 || der.len() < n {
            return None;
        }
        let len = der[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        (len, &der[n..])
    };
    if der.len() < len {
        return None;
    }
    let (contents, rest) = der.split_at(len);
    Some((tag, contents, rest))
}

fn push_element(out: &mut Vec<u8>, tag: u8, contents: &[u8]) {
    out.push(tag);
    match contents.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend_from_slice(&[0x81, n as u8]),
        n => out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(contents);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scalar: &[u8], tail: &[u8]) -> Vec<u8> {
        let mut inner = vec![0x02, 0x01, 0x01];
        push_element(&mut inner, 0x04, scalar);
        inner.extend_from_slice(tail);
        let mut out = Vec::new();
        push_element(&mut out, 0x30, &inner);
        out
    }

    #[test]
    fn a_padded_scalar_loses_its_zero_and_keeps_the_rest() {
        // [0] the curve, [1] the public key: carried over byte for byte.
        let tail = [0xa0, 0x02, 0x05, 0x00, 0xa1, 0x03, 0x03, 0x01, 0x00];
        let mut padded = vec![0u8];
        padded.extend_from_slice(&[0x80; 32]);
        assert_eq!(
            strip_scalar_padding(&key(&padded, &tail)),
            Some(key(&[0x80; 32], &tail))
        );
        // Already the field size, or not a SEC1 key at all: nothing to repair.
        assert_eq!(strip_scalar_padding(&key(&[0x7f; 32], &tail)), None);
        assert_eq!(strip_scalar_padding(&[0x30, 0x03, 0x02, 0x01, 0x00]), None);
        assert_eq!(strip_scalar_padding(&[0x30, 0x85]), None);
    }
}
