//! Splits a replica's output into lines: long lines are cut into partial records,
//! invalid UTF-8 is kept lossily, a last line without a newline is still kept.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest line kept in one record; longer lines continue in the next record.
pub const MAX_LINE: usize = 64 * 1024;

/// Reads `reader` to its end, calling `emit(line, partial)` for every line.
pub async fn read_lines<R, F>(reader: R, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(String, bool),
{
    read_line_batches(reader, |batch| {
        for (l, p) in batch {
            emit(l, p);
        }
    })
    .await;
}

/// Reads `reader` to its end, calling `emit` with the lines (and partial
/// records) of each read, in order: one call per read, not per line.
pub async fn read_line_batches<R, F>(mut reader: R, mut emit: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(Vec<(String, bool)>),
{
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut batch = Vec::new();
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[start..]) {
            let end = start + i;
            let line = &buf[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            batch.push((text(line), false));
            start = end + 1;
        }
        buf.drain(..start);
        // Strictly longer, so the byte after the cut is known and no character is split.
        while buf.len() > MAX_LINE {
            let cut = utf8_boundary(&buf, MAX_LINE);
            batch.push((text(&buf[..cut]), true));
            buf.drain(..cut);
        }
        if !batch.is_empty() {
            emit(batch);
        }
    }
    if !buf.is_empty() {
        emit(vec![(text(&buf), true)]);
    }
}

/// The bytes as text: valid UTF-8 as is, anything else lossily.
fn text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}

/// The largest index <= `max` that does not split a UTF-8 sequence (when the data is UTF-8).
fn utf8_boundary(b: &[u8], max: usize) -> usize {
    let mut i = max.min(b.len());
    let lowest = i.saturating_sub(3);
    while i > lowest && i < b.len() && (b[i] & 0xC0) == 0x80 {
        i -= 1;
    }
    if i == 0 { max.min(b.len()) } else { i }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: Vec<u8>) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        read_lines(&input[..], |l, p| out.push((l, p))).await;
        out
    }

    #[tokio::test]
    async fn splits_and_keeps_everything() {
        let got = lines(b"a\r\nb\n\xff\xfeok\nlast".to_vec()).await;
        assert_eq!(
            got,
            vec![
                ("a".into(), false),
                ("b".into(), false),
                ("\u{fffd}\u{fffd}ok".into(), false),
                ("last".into(), true)
            ]
        );
    }

    #[tokio::test]
    async fn long_lines_are_cut_not_dropped() {
        let mut input = "é".repeat(MAX_LINE).into_bytes();
        input.push(b'\n');
        let got = lines(input.clone()).await;
        let joined: String = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(joined.len(), input.len() - 1);
        assert!(got[0].1, "first piece is partial");
        assert!(!got.last().unwrap().1);
        assert!(got.iter().all(|(l, _)| !l.contains('\u{fffd}')));
    }
}
