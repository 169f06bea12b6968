//! A faster way to the same ids for the tokenizer layout of Qwen2 (and of the embedded
//! world): added tokens matched on the raw text, no normalizer or NFC, Qwen2's regex split,
//! byte-level mapping, BPE.
//!
//! The tokenizers crate's pipeline tracks an alignment per byte through every split and
//! builds an `Encoding` with a string per token; for prompts that is most of the time spent.
//! Here the text is cut at added tokens (leftmost-longest, as the tokenizers crate does), each
//! piece between them is split with the same regex engine and pattern, and each resulting
//! word is looked up in a per-thread cache of its ids, falling back to the BPE model itself
//! (`Model::tokenize`) the first time. Long pieces that recur whole (the system message of
//! every prompt) are cached whole. The pieces between added tokens are encoded independently
//! by the pipeline too, which is what makes both caches exact. Every step is the pipeline's own, so the ids are the
//! same; a segment that NFC could change (non-ASCII text under an NFC normalizer) goes
//! through the tokenizers pipeline whole. Tested against `tokenizers::Tokenizer::encode`.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;
use tokenizers::utils::SysRegex;
use tokenizers::Model;

/// Words cached per thread and tokenizer; the cache is emptied when it reaches this size.
const MAX_CACHED_WORDS: usize = 1 << 17;
/// Segments (text between added tokens) at least this long are cached once seen twice.
const MIN_CACHED_SEGMENT: usize = 64;
/// Segments cached per thread and tokenizer, and hashes of segments seen once, before
/// either is emptied.
const MAX_CACHED_SEGMENTS: usize = 256;
const MAX_SEEN_SEGMENTS: usize = 1 << 16;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One thread's caches for one tokenizer.
#[derive(Default)]
struct Caches {
    /// Pre-tokenized word -> ids.
    words: HashMap<Box<str>, Box<[u32]>>,
    /// Whole segments that recur (a system message in every prompt) -> ids.
    segments: HashMap<Box<str>, Box<[u32]>>,
    /// Hashes of the long segments seen once.
    seen: HashSet<u64>,
}

thread_local! {
    /// Caches per encoder id.
    static CACHES: RefCell<HashMap<u64, Caches>> = RefCell::new(HashMap::new());
}

fn hash_of(text: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The fast path for one tokenizer (see the module docs).
pub(crate) struct PieceEncoder {
    /// Tells the caches of different tokenizers apart.
    id: u64,
    /// Added tokens and their ids, longest first.
    added: Vec<(String, u32)>,
    /// Whether a byte starts some added token.
    starts_added: [bool; 256],
    split: SysRegex,
    /// The normalizer is NFC (else there is none).
    nfc: bool,
    /// The byte-level alphabet: the char each byte is written as.
    byte_chars: [char; 256],
}

/// GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others take the
/// chars from U+0100 on, in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    chars
}

impl PieceEncoder {
    /// The encoder for the layout in `tokenizer.json` (`json`), or `None` when the layout is
    /// another one (then the tokenizers pipeline encodes everything).
    pub(crate) fn for_layout(json: &Value) -> Option<Self> {
        let nfc = match &json["normalizer"] {
            Value::Null => false,
            n if n["type"] == "NFC" => true,
            _ => return None,
        };
        if !json["truncation"].is_null() || !json["padding"].is_null() {
            return None;
        }
        let post = &json["post_processor"];
        if !(post.is_null() || post["type"] == "ByteLevel") {
            return None;
        }
        let model = &json["model"];
        if model["type"] != "BPE" || !model["dropout"].is_null() {
            return None;
        }
        let pre = &json["pre_tokenizer"];
        let steps = pre["pretokenizers"].as_array()?;
        if pre["type"] != "Sequence" || steps.len() != 2 {
            return None;
        }
        let (split, byte_level) = (&steps[0], &steps[1]);
        let pattern = split["pattern"]["Regex"].as_str()?;
        if split["type"] != "Split" || split["behavior"] != "Isolated" || split["invert"] != false {
            return None;
        }
        if byte_level["type"] != "ByteLevel"
            || byte_level["add_prefix_space"] != false
            || byte_level["use_regex"] != false
        {
            return None;
        }
        let mut added = Vec::new();
        for token in json["added_tokens"].as_array()? {
            let plain = ["single_word", "lstrip", "rstrip", "normalized"]
                .iter()
                .all(|flag| token[flag] == false);
            let content = token["content"].as_str()?;
            if !plain || content.is_empty() {
                return None;
            }
            added.push((
                content.to_string(),
                u32::try_from(token["id"].as_u64()?).ok()?,
            ));
        }
        added.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let mut starts_added = [false; 256];
        for (content, _) in &added {
            starts_added[content.as_bytes()[0] as usize] = true;
        }
        Some(PieceEncoder {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            added,
            starts_added,
            split: SysRegex::new(pattern).ok()?,
            nfc,
            byte_chars: byte_chars(),
        })
    }

    /// The leftmost added token in `text` (the longest of those starting there): its start,
    /// length and id.
    fn next_added(&self, text: &str) -> Option<(usize, usize, u32)> {
        let bytes = text.as_bytes();
        (0..bytes.len())
            .filter(|&i| self.starts_added[bytes[i] as usize])
            .find_map(|i| {
                self.added
                    .iter()
                    .find(|(content, _)| bytes[i..].starts_with(content.as_bytes()))
                    .map(|(content, id)| (i, content.len(), *id))
            })
    }

    /// The ids of `text` with nothing added around it, as `inner.encode(text, false)` gives.
    pub(crate) fn encode(
        &self,
        inner: &tokenizers::Tokenizer,
        text: &str,
    ) -> tokenizers::Result<Vec<u32>> {
        CACHES.with(|caches| {
            let mut caches = caches.borrow_mut();
            let caches = caches.entry(self.id).or_default();
            let mut ids = Vec::with_capacity(text.len() / 3);
            let mut rest = text;
            while let Some((start, len, id)) = self.next_added(rest) {
                self.encode_segment(inner, caches, &rest[..start], &mut ids)?;
                ids.push(id);
                rest = &rest[start + len..];
            }
            self.encode_segment(inner, caches, rest, &mut ids)?;
            Ok(ids)
        })
    }

    /// Text without added tokens: from the segment cache when it recurs, else split and
    /// encoded word by word.
    fn encode_segment(
        &self,
        inner: &tokenizers::Tokenizer,
        caches: &mut Caches,
        segment: &str,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if segment.len() < MIN_CACHED_SEGMENT {
            return self.encode_words(inner, &mut caches.words, segment, ids);
        }
        if let Some(cached) = caches.segments.get(segment) {
            ids.extend_from_slice(cached);
            return Ok(());
        }
        let start = ids.len();
        self.encode_words(inner, &mut caches.words, segment, ids)?;
        // Cached the second time it is seen: most long segments occur once.
        if !caches.seen.insert(hash_of(segment)) {
            if caches.segments.len() >= MAX_CACHED_SEGMENTS {
                caches.segments.clear();
            }
            caches
                .segments
                .insert(segment.into(), ids[start..].to_vec().into_boxed_slice());
        } else if caches.seen.len() >= MAX_SEEN_SEGMENTS {
            caches.seen.clear();
        }
        Ok(())
    }

    /// Text without added tokens, split and encoded word by word.
    fn encode_words(
        &self,
        inner: &tokenizers::Tokenizer,
        words: &mut HashMap<Box<str>, Box<[u32]>>,
        segment: &str,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if segment.is_empty() {
            return Ok(());
        }
        if self.nfc && !segment.is_ascii() {
            ids.extend_from_slice(inner.encode(segment, false)?.get_ids());
            return Ok(());
        }
        let mut previous = 0;
        for (start, end) in self.split.find_iter(segment) {
            if previous != start {
                self.encode_word(inner, words, &segment[previous..start], ids)?;
            }
            self.encode_word(inner, words, &segment[start..end], ids)?;
            previous = end;
        }
        if previous != segment.len() {
            self.encode_word(inner, words, &segment[previous..], ids)?;
        }
        Ok(())
    }

    /// One pre-tokenized word: from the cache, else byte-level mapped and through BPE.
    fn encode_word(
        &self,
        inner: &tokenizers::Tokenizer,
        words: &mut HashMap<Box<str>, Box<[u32]>>,
        word: &str,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if word.is_empty() {
            return Ok(());
        }
        if let Some(cached) = words.get(word) {
            ids.extend_from_slice(cached);
            return Ok(());
        }
        let mapped: String = word.bytes().map(|b| self.byte_chars[b as usize]).collect();
        let word_ids: Box<[u32]> = inner
            .get_model()
            .tokenize(&mapped)?
            .iter()
            .map(|token| token.id)
            .collect();
        ids.extend_from_slice(&word_ids);
        if words.len() >= MAX_CACHED_WORDS {
            words.clear();
        }
        words.insert(word.into(), word_ids);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_gpt2s() {
        let chars = byte_chars();
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        assert_eq!(chars[0], 'Ā');
        assert_eq!(chars[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
