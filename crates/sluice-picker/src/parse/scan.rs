//! A validating scanner for the top level of a request body: the fast path of
//! [`super::parse_request`].
//!
//! serde_json reads an ignored 1 KiB prompt string at ~3 instructions per byte (an 8-byte
//! loop, then UTF-8 validation of the raw value) plus its per-field machinery: ~5.4k
//! instructions of the picker's ~45k per request. This scanner finds string ends with
//! `memchr` and checks control characters and UTF-8 in vectorisable passes, ~1 instruction
//! per byte.
//!
//! Contract: when [`fields`] returns `Some`, serde_json would have accepted the body and
//! found the same fields (the tests check this against serde on generated bodies). Whatever
//! it cannot vouch for cheaply — escaped or non-ASCII keys, a known field twice, nesting
//! deeper than [`MAX_DEPTH`], anything invalid — gives `None`, and the caller lets serde
//! decide, so error messages stay serde's.

/// The top-level fields routing reads, as raw JSON borrowed from the body (valid UTF-8,
/// as serde checks for the raw values it keeps).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found<'a> {
    pub model: Option<&'a [u8]>,
    pub stream: Option<bool>,
    pub cache_salt: Option<&'a [u8]>,
    pub prompt: Option<&'a [u8]>,
    pub messages: Option<&'a [u8]>,
    pub input: Option<&'a [u8]>,
    pub items: Option<&'a [u8]>,
    pub system: Option<&'a [u8]>,
}

/// Nesting the scanner follows (it recurses); deeper bodies are left to serde, which skips
/// ignored values without recursing.
const MAX_DEPTH: usize = 128;

/// The fields of a body that is one JSON object, or `None` to let serde decide.
pub(crate) fn fields(body: &[u8]) -> Option<Found<'_>> {
    let mut s = Scanner {
        b: body,
        i: 0,
        non_ascii: false,
    };
    let mut found = Found::default();
    s.ws();
    s.eat(b'{')?;
    s.ws();
    if !s.eat_if(b'}') {
        loop {
            s.ws();
            let key = s.key()?;
            s.ws();
            s.eat(b':')?;
            s.ws();
            let start = s.i;
            s.non_ascii = false;
            s.value(1)?;
            let raw = body.get(start..s.i)?;
            if key == b"stream" {
                if found.stream.is_some() {
                    return None;
                }
                // Option<bool>: null is "absent"; anything but a boolean is serde's error.
                found.stream = match raw {
                    b"true" => Some(true),
                    b"false" => Some(false),
                    _ => return None,
                };
            } else if let Some(slot) = found.slot(key) {
                if slot.is_some() {
                    // Duplicate field: serde's error.
                    return None;
                }
                // serde validates UTF-8 of every raw value it keeps; bytes outside strings
                // are ASCII by then, so an all-ASCII value needs no second pass.
                if s.non_ascii {
                    std::str::from_utf8(raw).ok()?;
                }
                *slot = Some(raw);
            }
            s.ws();
            if s.eat_if(b',') {
                continue;
            }
            s.eat(b'}')?;
            break;
        }
    }
    s.ws();
    (s.i == body.len()).then_some(found)
}

impl<'a> Found<'a> {
    fn slot(&mut self, key: &[u8]) -> Option<&mut Option<&'a [u8]>> {
        Some(match key {
            b"model" => &mut self.model,
            b"cache_salt" => &mut self.cache_salt,
            b"prompt" => &mut self.prompt,
            b"messages" => &mut self.messages,
            b"input" => &mut self.input,
            b"items" => &mut self.items,
            b"system" => &mut self.system,
            _ => return None,
        })
    }
}

/// The smallest byte (control characters are < 0x20) and the OR of all bytes (non-ASCII
/// sets 0x80) in one pass: plain min/or reductions, which the compiler vectorises.
fn byte_min_or(text: &[u8]) -> (u8, u8) {
    text.iter()
        .fold((u8::MAX, 0), |(min, or), &c| (min.min(c), or | c))
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    /// A string since the last reset held a byte >= 0x80 (then UTF-8 needs checking).
    non_ascii: bool,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.eat_if(c).then_some(())
    }

    fn eat_if(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// An object key without escapes, all ASCII (serde decodes escapes and validates UTF-8
    /// of keys; such keys are rare enough to leave to it).
    fn key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let key = plain_key(self.b.get(self.i..)?)?;
        self.i += key.len() + 1;
        Some(key)
    }

    /// Skips one value, validating it as serde_json's `ignore_value` does.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string_rest()
            }
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn literal(&mut self, lit: &[u8]) -> Option<()> {
        if self.b.get(self.i..)?.starts_with(lit) {
            self.i += lit.len();
            Some(())
        } else {
            None
        }
    }

    /// After the opening quote: up to and including the closing quote. No control
    /// characters; escapes as JSON allows (`\u` with four hex digits, any code unit, as
    /// serde's ignore path accepts).
    fn string_rest(&mut self) -> Option<()> {
        loop {
            let rest = self.b.get(self.i..)?;
            let at = memchr::memchr2(b'"', b'\\', rest)?;
            let (min, or) = byte_min_or(rest.get(..at)?);
            if min < 0x20 {
                return None;
            }
            self.non_ascii |= or >= 0x80;
            self.i += at + 1;
            if rest.get(at) == Some(&b'"') {
                return Some(());
            }
            match self.peek()? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                b'u' => {
                    let hex = self.b.get(self.i + 1..self.i + 5)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return None;
                    }
                    self.i += 5;
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.eat_if(b'}') {
            return Some(());
        }
        loop {
            self.ws();
            self.eat(b'"')?;
            self.string_rest()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            self.value(depth)?;
            self.ws();
            if self.eat_if(b',') {
                continue;
            }
            return self.eat(b'}');
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.eat_if(b']') {
            return Some(());
        }
        loop {
            self.ws();
            self.value(depth)?;
            self.ws();
            if self.eat_if(b',') {
                continue;
            }
            return self.eat(b']');
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        self.eat_if(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat_if(b'.') {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }
}

/// The object key at the start of `rest` (just after its opening quote), when it has no
/// escapes and is all printable ASCII; the closing quote follows it. `None` leaves the
/// document to serde, which decodes escapes and validates UTF-8 in keys.
pub(crate) fn plain_key(rest: &[u8]) -> Option<&[u8]> {
    let end = memchr::memchr(b'"', rest)?;
    let key = rest.get(..end)?;
    if key
        .iter()
        .any(|&c| c == b'\\' || !(0x20..0x80).contains(&c))
    {
        return None;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// serde's answer for the same body, in the scanner's shape.
    fn serde_fields(body: &[u8]) -> Option<Found<'_>> {
        serde_json::from_slice::<super::super::Fields<'_>>(body)
            .ok()
            .map(Found::from)
    }

    fn agrees(body: &[u8]) {
        if let Some(fast) = fields(body) {
            assert_eq!(
                Some(fast),
                serde_fields(body),
                "scanner accepted what serde reads differently: {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    const SEEDS: &[&str] = &[
        r#"{"model":"m","prompt":"hello","stream":true,"max_tokens":10}"#,
        r#" { "model" : "m" , "messages" : [ {"role":"user","content":"hi \"x\" \u00e9\n"} ] , "stream" : false } "#,
        r#"{"model":"m","input":["a","b"],"temperature":-0.5e-3,"n":0,"x":null,"y":{"z":[1,2.0,3E+2]}}"#,
        r#"{"model":"m","system":"be brief","messages":[1],"cache_salt":"s\/alt","items":{}}"#,
        r#"{"model":"m","prompt":"snow ☃ and 𝄞","stop":["\t"],"logit_bias":{"50256":-100}}"#,
        r#"{}"#,
    ];

    #[test]
    fn accepted_bodies_read_exactly_as_serde_reads_them() {
        for body in SEEDS {
            let fast = fields(body.as_bytes());
            assert!(
                fast.is_some(),
                "the fast path declined a plain body: {body}"
            );
            agrees(body.as_bytes());
        }
    }

    #[test]
    fn what_serde_rejects_or_decodes_is_left_to_serde() {
        let declined: &[&[u8]] = &[
            br#"{"model":"m","model":"n","prompt":"x"}"#,
            br#"{"mod\u0065l":"m","prompt":"x"}"#,
            br#"{"model":"m","prompt":"x",}"#,
            br#"{"model":"m","prompt":"a	b"}"#,
            br#"{"model":"m","prompt":"\x"}"#,
            br#"{"model":"m","prompt":"\u12G4"}"#,
            br#"{"model":"m","n":01}"#,
            br#"{"model":"m","n":1.}"#,
            br#"{"model":"m","n":-}"#,
            br#"{"model":"m","stream":"yes"}"#,
            br#"{"model":"m","stream":null}"#,
            br#"{"model":"m"} x"#,
            br#"{"model":"m""#,
            b"{\"model\":\"m\",\"prompt\":\"\xff\"}",
            br#"{"model":tru}"#,
        ];
        for body in declined {
            assert_eq!(fields(body), None, "{:?}", String::from_utf8_lossy(body));
        }
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200));
        // The scanner recurses, so it stops at serde's limit; serde skips ignored values
        // without recursing and accepts the body, which parse_request then still reads.
        assert_eq!(fields(deep.as_bytes()), None);
        assert!(serde_fields(deep.as_bytes()).is_some());
    }

    #[test]
    fn mutated_bodies_never_make_the_scanner_disagree_with_serde() {
        // Random edits of valid bodies (seeded): whatever the scanner accepts, serde accepts
        // with the same fields.
        let alphabet = b"{}[]\":,\\ \n\tu0a9eE+-.tfnl\x01\xc3\xa9";
        let mut rng = SmallRng::seed_from_u64(8);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let seed = SEEDS[rng.random_range(0..SEEDS.len())].as_bytes();
            let mut body = seed.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=body.len());
                match rng.random_range(0..3) {
                    0 if at < body.len() => {
                        body.remove(at);
                    }
                    1 => body.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ if at < body.len() => {
                        body[at] = alphabet[rng.random_range(0..alphabet.len())]
                    }
                    _ => {}
                }
            }
            if fields(&body).is_some() {
                accepted += 1;
            }
            agrees(&body);
        }
        // The edits must leave some bodies valid, or the test checks nothing.
        assert!(
            accepted > 1_000,
            "only {accepted} mutated bodies were accepted"
        );
    }
}
