//! `EncodedDeltaDiscoveryResponse` (see `discovery_encoded.proto`), by
//! hand: a delta response whose resources may be given as runs of already
//! encoded `resources` field entries.
//!
//! The control plane's first sync sends every client the same resources
//! in the same chunks. Built from a list of per-resource buffers, each
//! client's response is encoded resource by resource (a reference count
//! taken, a length computed, a small scattered copy, for each of 12,500
//! resources and 100 clients); a run encoded once per snapshot is one
//! contiguous copy of memory that stays in cache from client to client.
//! On the wire both are the same bytes, in field order 1, 2, 4, 5, 6 as
//! prost writes them, so the message is byte for byte a published
//! `DeltaDiscoveryResponse`.

use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::encoding::{
    decode_varint, encode_key, encode_varint, encoded_len_varint, key_len, skip_field, string,
    DecodeContext, WireType,
};
use prost::DecodeError;

/// Field number of `resources` in `DeltaDiscoveryResponse`.
const RESOURCES: u32 = 2;

#[derive(Clone, PartialEq, Eq, Debug)]
enum Part {
    /// One encoded `Resource`.
    One(Bytes),
    /// `count` complete `resources` field entries (key, length, value).
    Run { entries: Bytes, count: usize },
}

/// The `resources` of a delta response, each an encoded
/// `envoy.service.discovery.v3.Resource`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct EncodedResources {
    parts: Vec<Part>,
}

impl EncodedResources {
    /// One encoded `Resource`.
    pub fn push(&mut self, resource: Bytes) {
        self.parts.push(Part::One(resource));
    }

    /// A run made by [`EncodedResources::run`].
    pub fn push_run(&mut self, run: &Run) {
        self.parts.push(Part::Run {
            entries: run.entries.clone(),
            count: run.count,
        });
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::One(_) => 1,
                Part::Run { count, .. } => *count,
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each encoded `Resource`, in order (slices of the message's buffer:
    /// no copy).
    pub fn iter(&self) -> impl Iterator<Item = Bytes> + '_ {
        self.parts.iter().flat_map(|p| {
            let (one, run) = match p {
                Part::One(b) => (Some(b.clone()), None),
                Part::Run { entries, .. } => (None, Some(RunIter(entries.clone()))),
            };
            one.into_iter().chain(run.into_iter().flatten())
        })
    }

    /// Encodes `resources` (each an encoded `Resource`) once, for any
    /// number of responses.
    pub fn run<'a>(resources: impl IntoIterator<Item = &'a Bytes> + Clone) -> Run {
        let len: usize = resources
            .clone()
            .into_iter()
            .map(|r| entry_len(r.len()))
            .sum();
        let mut entries = BytesMut::with_capacity(len);
        let mut count = 0;
        for r in resources {
            encode_key(RESOURCES, WireType::LengthDelimited, &mut entries);
            encode_varint(r.len() as u64, &mut entries);
            entries.put_slice(r);
            count += 1;
        }
        Run {
            entries: entries.freeze(),
            count,
        }
    }

    fn encoded_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::One(b) => entry_len(b.len()),
                Part::Run { entries, .. } => entries.len(),
            })
            .sum()
    }

    fn encode(&self, buf: &mut impl BufMut) {
        for p in &self.parts {
            match p {
                Part::One(b) => {
                    encode_key(RESOURCES, WireType::LengthDelimited, buf);
                    encode_varint(b.len() as u64, buf);
                    buf.put_slice(b);
                }
                Part::Run { entries, .. } => buf.put_slice(entries),
            }
        }
    }
}

/// Resources encoded as `resources` field entries, shared by reference.
#[derive(Clone, Debug, Default)]
pub struct Run {
    entries: Bytes,
    count: usize,
}

impl Run {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn entry_len(value_len: usize) -> usize {
    key_len(RESOURCES) + encoded_len_varint(value_len as u64) + value_len
}

/// The values of a run's entries (which [`EncodedResources::run`] wrote,
/// so they are well formed).
struct RunIter(Bytes);

impl Iterator for RunIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if !self.0.has_remaining() {
            return None;
        }
        // The key, then the length.
        decode_varint(&mut self.0).ok()?;
        let len = decode_varint(&mut self.0).ok()? as usize;
        (len <= self.0.remaining()).then(|| self.0.split_to(len))
    }
}

/// A `DeltaDiscoveryResponse` as the control plane sends it.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct EncodedDeltaDiscoveryResponse {
    pub system_version_info: String,
    pub resources: EncodedResources,
    pub type_url: String,
    pub nonce: String,
    pub removed_resources: Vec<String>,
}

impl prost::Message for EncodedDeltaDiscoveryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.system_version_info.is_empty() {
            string::encode(1, &self.system_version_info, buf);
        }
        self.resources.encode(buf);
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.nonce.is_empty() {
            string::encode(5, &self.nonce, buf);
        }
        string::encode_repeated(6, &self.removed_resources, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => string::merge(wire_type, &mut self.system_version_info, buf, ctx),
            RESOURCES => {
                let mut value = Bytes::new();
                prost::encoding::bytes::merge(wire_type, &mut value, buf, ctx)?;
                self.resources.push(value);
                Ok(())
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.nonce, buf, ctx),
            6 => string::merge_repeated(wire_type, &mut self.removed_resources, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let opt = |tag: u32, s: &String| {
            if s.is_empty() {
                0
            } else {
                string::encoded_len(tag, s)
            }
        };
        opt(1, &self.system_version_info)
            + self.resources.encoded_len()
            + opt(4, &self.type_url)
            + opt(5, &self.nonce)
            + string::encoded_len_repeated(6, &self.removed_resources)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::discovery::{DeltaDiscoveryResponse, Resource};

    fn resource(name: &str) -> Resource {
        Resource {
            name: name.into(),
            version: format!("v-{name}"),
            resource: Some(prost_types::Any {
                type_url: "t".into(),
                value: name.repeat(50).into_bytes(),
            }),
            ..Default::default()
        }
    }

    /// Resources given one by one, as runs, or mixed: the bytes prost
    /// writes for the published message, and they decode back.
    #[test]
    fn same_bytes_as_the_published_message() {
        let all: Vec<Resource> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|n| resource(n))
            .collect();
        let encoded: Vec<Bytes> = all.iter().map(|r| r.encode_to_vec().into()).collect();
        let published = DeltaDiscoveryResponse {
            system_version_info: "7".into(),
            resources: all.clone(),
            type_url: "t".into(),
            nonce: "3".into(),
            removed_resources: vec!["x".into(), "y".into()],
            ..Default::default()
        }
        .encode_to_vec();
        let mut ours = EncodedDeltaDiscoveryResponse {
            system_version_info: "7".into(),
            type_url: "t".into(),
            nonce: "3".into(),
            removed_resources: vec!["x".into(), "y".into()],
            ..Default::default()
        };
        ours.resources.push(encoded[0].clone());
        ours.resources
            .push_run(&EncodedResources::run(&encoded[1..4]));
        ours.resources.push(encoded[4].clone());
        assert_eq!(ours.resources.len(), 5);
        let bytes = ours.encode_to_vec();
        assert_eq!(bytes.len(), ours.encoded_len());
        assert_eq!(bytes, published);

        let back = EncodedDeltaDiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(back.resources.iter().collect::<Vec<_>>(), encoded);
        assert_eq!(back.nonce, "3");
        assert_eq!(back.removed_resources, ["x", "y"]);
        // A run iterates to its resources too.
        let run = EncodedResources::run(&encoded);
        let mut r = EncodedResources::default();
        r.push_run(&run);
        assert_eq!(r.iter().collect::<Vec<_>>(), encoded);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn empty_response() {
        let m = EncodedDeltaDiscoveryResponse::default();
        assert_eq!(
            m.encode_to_vec(),
            DeltaDiscoveryResponse::default().encode_to_vec()
        );
        assert!(m.resources.is_empty());
    }

    #[test]
    fn malformed_resources_field_is_an_error() {
        // Field 2 as a varint.
        assert!(EncodedDeltaDiscoveryResponse::decode(&[0x10, 0x01][..]).is_err());
        // Field 2 claiming more bytes than there are.
        assert!(EncodedDeltaDiscoveryResponse::decode(&[0x12, 0x05, 0x00][..]).is_err());
    }
}
