//! Buffered records in join state: the whole [`Record`] with its [`Origin`], so a record emitted
//! later (matched by a right record, or unmatched when its window closes) still traces back to
//! its Kafka message and dead-letters with the original bytes.

use std::sync::Arc;

use bytes::Bytes;

use crate::record::{Header, Origin, Record};

const VERSION: u8 = 1;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, b: Option<&[u8]>) {
    match b {
        Some(b) => {
            out.push(1);
            put_bytes(out, b);
        }
        None => out.push(0),
    }
}

fn put_headers(out: &mut Vec<u8>, hs: &[Header]) {
    out.extend_from_slice(&(hs.len() as u32).to_le_bytes());
    for h in hs {
        put_bytes(out, h.key.as_bytes());
        put_bytes(out, &h.value);
    }
}

pub fn encode(r: &Record) -> Vec<u8> {
    let o = &r.origin;
    let mut out = Vec::with_capacity(64 + o.value.len() + r.value.len());
    out.push(VERSION);
    put_bytes(&mut out, o.topic.as_bytes());
    out.extend_from_slice(&o.partition.to_le_bytes());
    out.extend_from_slice(&o.offset.to_le_bytes());
    match o.timestamp_ms {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => out.push(0),
    }
    put_opt(&mut out, o.key.as_deref());
    put_bytes(&mut out, &o.value);
    put_headers(&mut out, &o.headers);
    put_opt(&mut out, r.key.as_deref());
    put_bytes(&mut out, &r.value);
    put_headers(&mut out, &r.headers);
    put_opt(&mut out, r.table.as_deref().map(str::as_bytes));
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn opt(&mut self) -> Option<Option<&'a [u8]>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(self.bytes()?)),
        }
    }
    fn headers(&mut self) -> Option<Vec<Header>> {
        let n = self.u32()?;
        let mut hs = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            let key = self.string()?;
            let value = Bytes::copy_from_slice(self.bytes()?);
            hs.push(Header { key, value });
        }
        Some(hs)
    }
}

pub fn decode(data: &[u8]) -> Option<Record> {
    let mut r = Reader(data);
    if r.u8()? != VERSION {
        return None;
    }
    let topic = r.string()?;
    let partition = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
    let offset = r.i64()?;
    let timestamp_ms = match r.u8()? {
        0 => None,
        _ => Some(r.i64()?),
    };
    let okey = r.opt()?.map(Bytes::copy_from_slice);
    let ovalue = Bytes::copy_from_slice(r.bytes()?);
    let oheaders = r.headers()?;
    let key = r.opt()?.map(Bytes::copy_from_slice);
    let value = Bytes::copy_from_slice(r.bytes()?);
    let headers = r.headers()?;
    let table = match r.opt()? {
        Some(t) => Some(String::from_utf8(t.to_vec()).ok()?),
        None => None,
    };
    Some(Record {
        origin: Arc::new(Origin {
            topic: Arc::from(topic.as_str()),
            partition,
            offset,
            timestamp_ms,
            key: okey,
            value: ovalue,
            headers: oheaders,
        }),
        key,
        value,
        headers,
        table,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let origin = Arc::new(Origin {
            topic: Arc::from("tx"),
            partition: 3,
            offset: 77,
            timestamp_ms: Some(-1),
            key: Some(Bytes::from_static(b"k")),
            value: Bytes::from_static(b"raw"),
            headers: vec![Header {
                key: "h".into(),
                value: Bytes::from_static(b"v"),
            }],
        });
        let r = Record {
            origin,
            key: None,
            value: Bytes::from_static(b"{\"a\":1}"),
            headers: vec![],
            table: Some("t2".into()),
        };
        assert!(decode(&encode(&r)[..10]).is_none());
        let d = decode(&encode(&r)).unwrap();
        assert_eq!(d.origin, r.origin);
        assert_eq!(
            (d.key, d.value, d.headers, d.table),
            (r.key, r.value, r.headers, r.table)
        );
    }
}
