//! Streaming reader of `PUT {name}` bodies: splits the JSON document npm sends into a small
//! *skeleton* (the document without the tarball) and the tarball itself, decoded on the fly
//! and handed to the blob store while the body is still arriving.
//!
//! `npm publish` sends the tarball base64-encoded inside the document, at
//! `_attachments.{file}.data`. Reading the body whole would hold the upload three times
//! (body, parsed string, decoded bytes); a node must stay within a few tens of MiB for a
//! 1 GiB upload, so instead:
//!
//! ```text
//!   body frames ──▶ Scanner ─┬─ everything else (whitespace dropped) ─▶ skeleton, ≤ 16 MiB,
//!   (64 KiB pieces)          │        with `"data": ""` in place of the tarball ─▶ serde
//!                            └─ _attachments.*.data: JSON-unescape ─▶ base64-decode ─▶
//!                                  TarballSender ─bounded channel─▶ store_tarball ─▶
//!                                  Registry::store_blob (runs concurrently with the scan)
//! ```
//!
//! The scanner checks the document's structure (brackets, commas, colons, strings and
//! their escapes), since it must know where in the document it is; numbers and literals
//! are copied unchecked because the skeleton's parse checks them. This module validates
//! nothing about the package: `publish.rs` does, and decides whether the stored tarball's
//! body ends normally ([`TarballSender::finish`]) or is cut short so the store keeps
//! nothing (dropping or aborting the sender).

use std::mem;

use base64::DecodeError;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt, stream};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use granary_format::body::{self, BodyError};
use granary_format::model::BlobInfo;
use granary_format::{Body, FormatError, Registry, RegistryError};

/// The largest publish document without its tarball. Manifests and READMEs are far
/// smaller; a document update (`npm deprecate` sends the whole packument back) of a
/// package with thousands of versions is the largest thing that legitimately comes close.
pub(crate) const SKELETON_LIMIT: usize = 16 * 1024 * 1024;

/// Input is scanned in pieces of at most this size, so a large body frame still becomes
/// small tarball frames (≤ 48 KiB decoded each).
const PIECE: usize = 64 * 1024;

/// Tarball frames waiting for the blob store: with [`PIECE`]-sized input, at most about
/// half a MiB of decoded tarball is in flight per publish.
const CHANNEL_FRAMES: usize = 8;

/// JSON nests no deeper than this (serde_json's own recursion limit), which bounds the
/// scanner's stack.
const MAX_DEPTH: usize = 128;

/// The first two bytes of every gzip stream.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Why a body is refused while it is scanned; ends the scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanError {
    /// Not JSON, or cut short.
    Syntax {
        /// What was wrong.
        what: &'static str,
        /// Byte offset in the body.
        offset: u64,
    },
    /// The document without its tarball exceeds [`Scanner`]'s limit.
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl From<ScanError> for FormatError {
    fn from(err: ScanError) -> Self {
        match err {
            ScanError::Syntax { what, offset } => FormatError::BadRequest(format!(
                "invalid package document: {what} at byte {offset}"
            )),
            ScanError::TooLarge { limit } => FormatError::PayloadTooLarge {
                limit: u64::try_from(limit).unwrap_or(u64::MAX),
            },
        }
    }
}

/// What the scanner learned about the tarball (the first attachment's `data`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Tarball {
    /// Decoded bytes (up to the first base64 error).
    pub(crate) size: u64,
    /// Why `data` is not valid base64 (the `base64` crate's wording), if it is not.
    pub(crate) invalid_base64: Option<String>,
    /// Whether the decoded bytes start with the gzip magic number.
    pub(crate) gzip: bool,
}

/// A scanned document.
#[derive(Debug)]
pub(crate) struct Scanned {
    /// The document without whitespace between tokens, with `""` as every attachment's
    /// `data` string.
    pub(crate) skeleton: Vec<u8>,
    /// The first attachment's tarball, if some attachment had a `data` string.
    pub(crate) tarball: Option<Tarball>,
    /// How many `_attachments.*.data` strings the document had (only the first one is
    /// decoded; a publish needs exactly one).
    pub(crate) data_strings: usize,
}

/// An incremental scanner of a publish document: fed pieces of any size, it keeps the
/// skeleton and appends the decoded tarball to the caller's buffer.
#[derive(Debug)]
pub(crate) struct Scanner {
    skeleton: Vec<u8>,
    skeleton_limit: usize,
    /// Open objects and arrays.
    stack: Vec<Container>,
    state: State,
    /// Where the value about to start sits, decided by its container and key.
    slot: Slot,
    /// The key being read (decoded), to recognise `_attachments` and `data`.
    key: KeyText,
    /// Escape state of the string being read.
    escape: Escape,
    /// Bytes fed so far, for error messages.
    offset: u64,
    tarball: Option<TarballDecoder>,
    data_strings: usize,
}

/// An open container. Objects carry their role, which decides the slot of their members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object(Role),
    Array,
}

/// What an object is in a publish document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The document itself.
    Root,
    /// `_attachments`.
    Attachments,
    /// One `_attachments` entry.
    Attachment,
    /// Anything else.
    Other,
}

/// Where the next value goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Root,
    Attachments,
    Attachment,
    /// `_attachments.*.data`: a string here is a tarball.
    Data,
    Other,
}

/// What the scanner expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A value; `]` too when `may_close` (right after `[`).
    Value { may_close: bool },
    /// A member's key; `}` too when `may_close` (right after `{`).
    Key { may_close: bool },
    /// The `:` after a key.
    Colon,
    /// `,` or the container's closing bracket.
    AfterValue,
    /// More of a number or literal, copied until a delimiter.
    Scalar,
    /// Inside a string.
    String(Target),
    /// Only whitespace may follow the document.
    Done,
}

/// What the string being read is, and so where its content goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// A value copied into the skeleton.
    Copy,
    /// A key: copied, and decoded into [`Scanner::key`].
    Key,
    /// The tarball: decoded, not copied.
    Data,
    /// Another attachment's `data`: dropped (the publish is refused anyway).
    SkipData,
}

/// Where a string is in an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    Unicode { digits: u8, value: u32 },
}

/// One step of a string's raw text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A byte of the string's value (raw, or from a one-letter escape).
    Byte(u8),
    /// A `\uXXXX` escape.
    Code(u32),
    /// Part of an escape.
    Pending,
    /// The closing quote.
    End,
}

/// The start of a key, decoded; long keys only need to be known not to match.
#[derive(Debug, Clone, Copy, Default)]
struct KeyText {
    bytes: [u8; 16],
    len: usize,
    overflow: bool,
}

impl KeyText {
    fn push(&mut self, b: u8) {
        match self.bytes.get_mut(self.len) {
            Some(slot) => {
                *slot = b;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    fn push_code(&mut self, code: u32) {
        match u8::try_from(code) {
            Ok(b) if b.is_ascii() => self.push(b),
            _ => self.overflow = true,
        }
    }

    fn is(&self, name: &[u8]) -> bool {
        !self.overflow && self.bytes.get(..self.len) == Some(name)
    }
}

impl Scanner {
    /// A scanner whose skeleton may grow to `skeleton_limit` bytes.
    pub(crate) fn new(skeleton_limit: usize) -> Self {
        Self {
            skeleton: Vec::new(),
            skeleton_limit,
            stack: Vec::new(),
            state: State::Value { may_close: false },
            slot: Slot::Root,
            key: KeyText::default(),
            escape: Escape::None,
            offset: 0,
            tarball: None,
            data_strings: 0,
        }
    }

    /// Scans the next piece of the body, appending decoded tarball bytes to `out`.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), ScanError> {
        let start = out.len();
        let mut rest = input;
        while let Some(&b) = rest.first() {
            if let State::String(target) = self.state
                && self.escape == Escape::None
            {
                // Fast path: the plain run of a string up to a quote, backslash or
                // control character. The tarball's base64 goes by here.
                let run = plain_run(rest);
                if run > 0 {
                    let (plain, tail) = rest.split_at(run);
                    self.string_run(target, plain, out)?;
                    self.offset += plain.len() as u64;
                    rest = tail;
                    continue;
                }
            }
            if self.step(b, out)? {
                self.offset += 1;
                rest = rest.get(1..).unwrap_or_default();
            }
        }
        if let Some(tarball) = &mut self.tarball {
            tarball.decoded(out.get(start..).unwrap_or_default());
        }
        Ok(())
    }

    /// True once the tarball is known to be refused (not base64, not gzip): its bytes
    /// need not reach the store any more.
    pub(crate) fn tarball_rejected(&self) -> bool {
        self.tarball.as_ref().is_some_and(TarballDecoder::rejected)
    }

    /// Ends the input: the document must be complete.
    pub(crate) fn finish(self) -> Result<Scanned, ScanError> {
        let complete = match self.state {
            State::Done => true,
            // A bare number or literal ends with the input; the skeleton's parse refuses it.
            State::Scalar => self.stack.is_empty(),
            _ => false,
        };
        if !complete {
            return Err(self.syntax("the document ends early"));
        }
        Ok(Scanned {
            skeleton: self.skeleton,
            tarball: self.tarball.map(TarballDecoder::summary),
            data_strings: self.data_strings,
        })
    }

    fn syntax(&self, what: &'static str) -> ScanError {
        ScanError::Syntax {
            what,
            offset: self.offset,
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<(), ScanError> {
        if self.skeleton.len().saturating_add(bytes.len()) > self.skeleton_limit {
            return Err(ScanError::TooLarge {
                limit: self.skeleton_limit,
            });
        }
        self.skeleton.extend_from_slice(bytes);
        Ok(())
    }

    /// Consumes one byte outside a string's plain run; `false` when the byte ends a
    /// number or literal and must be looked at again.
    fn step(&mut self, b: u8, out: &mut Vec<u8>) -> Result<bool, ScanError> {
        match self.state {
            State::String(target) => {
                self.string_byte(target, b, out)?;
                Ok(true)
            }
            State::Scalar => {
                if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.') {
                    self.emit(&[b])?;
                    Ok(true)
                } else {
                    self.end_value();
                    Ok(false)
                }
            }
            _ if matches!(b, b' ' | b'\t' | b'\n' | b'\r') => Ok(true),
            State::Value { may_close } => {
                match b {
                    b'{' => {
                        let role = match self.slot {
                            Slot::Root => Role::Root,
                            Slot::Attachments => Role::Attachments,
                            Slot::Attachment => Role::Attachment,
                            Slot::Data | Slot::Other => Role::Other,
                        };
                        self.open(Container::Object(role), b)?;
                        self.state = State::Key { may_close: true };
                    }
                    b'[' => {
                        self.open(Container::Array, b)?;
                        self.slot = Slot::Other;
                        self.state = State::Value { may_close: true };
                    }
                    b'"' => self.start_string()?,
                    b']' if may_close => self.close(b)?,
                    b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                        self.emit(&[b])?;
                        self.state = State::Scalar;
                    }
                    _ => return Err(self.syntax("expected a value")),
                }
                Ok(true)
            }
            State::Key { may_close } => {
                match b {
                    b'"' => {
                        self.emit(&[b])?;
                        self.key = KeyText::default();
                        self.escape = Escape::None;
                        self.state = State::String(Target::Key);
                    }
                    b'}' if may_close => self.close(b)?,
                    _ => return Err(self.syntax("expected a string key")),
                }
                Ok(true)
            }
            State::Colon => {
                if b != b':' {
                    return Err(self.syntax("expected ':' after a key"));
                }
                self.emit(&[b])?;
                self.state = State::Value { may_close: false };
                Ok(true)
            }
            State::AfterValue => {
                match (b, self.stack.last()) {
                    (b',', Some(Container::Object(_))) => {
                        self.emit(&[b])?;
                        self.state = State::Key { may_close: false };
                    }
                    (b',', Some(Container::Array)) => {
                        self.emit(&[b])?;
                        self.slot = Slot::Other;
                        self.state = State::Value { may_close: false };
                    }
                    (b'}', Some(Container::Object(_))) | (b']', Some(Container::Array)) => {
                        self.close(b)?;
                    }
                    _ => return Err(self.syntax("expected ',' or a closing bracket")),
                }
                Ok(true)
            }
            State::Done => Err(self.syntax("unexpected characters after the document")),
        }
    }

    fn open(&mut self, container: Container, bracket: u8) -> Result<(), ScanError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.syntax("the document is nested too deeply"));
        }
        self.emit(&[bracket])?;
        self.stack.push(container);
        Ok(())
    }

    fn close(&mut self, bracket: u8) -> Result<(), ScanError> {
        self.emit(&[bracket])?;
        self.stack.pop();
        self.end_value();
        Ok(())
    }

    fn end_value(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }

    /// A string value starts (its opening quote was just read).
    fn start_string(&mut self) -> Result<(), ScanError> {
        self.emit(b"\"")?;
        self.escape = Escape::None;
        let target = if self.slot == Slot::Data {
            self.data_strings += 1;
            if self.tarball.is_none() {
                self.tarball = Some(TarballDecoder::default());
                Target::Data
            } else {
                Target::SkipData
            }
        } else {
            Target::Copy
        };
        self.state = State::String(target);
        Ok(())
    }

    /// A plain run of a string: no quote, backslash or control character in it.
    fn string_run(
        &mut self,
        target: Target,
        run: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ScanError> {
        match target {
            Target::Copy => self.emit(run),
            Target::Key => {
                for &b in run {
                    self.key.push(b);
                }
                self.emit(run)
            }
            Target::Data => {
                if let Some(tarball) = &mut self.tarball {
                    tarball.push_run(run, out);
                }
                Ok(())
            }
            Target::SkipData => Ok(()),
        }
    }

    /// One byte of a string outside a plain run.
    fn string_byte(&mut self, target: Target, b: u8, out: &mut Vec<u8>) -> Result<(), ScanError> {
        let unit = match unescape(&mut self.escape, b) {
            Ok(unit) => unit,
            Err(what) => return Err(self.syntax(what)),
        };
        match target {
            Target::Copy | Target::Key => self.emit(&[b])?,
            Target::Data | Target::SkipData if unit == Unit::End => self.emit(b"\"")?,
            Target::Data | Target::SkipData => {}
        }
        match (target, unit) {
            (_, Unit::Pending) => {}
            (Target::Key, Unit::Byte(c)) => self.key.push(c),
            (Target::Key, Unit::Code(code)) => self.key.push_code(code),
            (Target::Key, Unit::End) => {
                self.slot = match self.stack.last() {
                    Some(Container::Object(Role::Root)) if self.key.is(b"_attachments") => {
                        Slot::Attachments
                    }
                    Some(Container::Object(Role::Attachments)) => Slot::Attachment,
                    Some(Container::Object(Role::Attachment)) if self.key.is(b"data") => Slot::Data,
                    _ => Slot::Other,
                };
                self.state = State::Colon;
            }
            (Target::Data, Unit::Byte(c)) => {
                if let Some(tarball) = &mut self.tarball {
                    tarball.push_run(&[c], out);
                }
            }
            (Target::Data, Unit::Code(code)) => {
                if let Some(tarball) = &mut self.tarball {
                    tarball.push_code(code, out);
                }
            }
            (Target::Data, Unit::End) => {
                if let Some(tarball) = &mut self.tarball {
                    tarball.end();
                }
                self.end_value();
            }
            (Target::Copy | Target::SkipData, Unit::End) => self.end_value(),
            (Target::Copy | Target::SkipData, Unit::Byte(_) | Unit::Code(_)) => {}
        }
        Ok(())
    }
}

/// Advances a string's escape state by one raw byte.
fn unescape(escape: &mut Escape, b: u8) -> Result<Unit, &'static str> {
    match *escape {
        Escape::None => match b {
            b'"' => Ok(Unit::End),
            b'\\' => {
                *escape = Escape::Backslash;
                Ok(Unit::Pending)
            }
            0..0x20 => Err("control character in a string"),
            _ => Ok(Unit::Byte(b)),
        },
        Escape::Backslash => {
            *escape = Escape::None;
            let byte = match b {
                b'"' | b'\\' | b'/' => b,
                b'b' => 0x08,
                b'f' => 0x0c,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'u' => {
                    *escape = Escape::Unicode {
                        digits: 0,
                        value: 0,
                    };
                    return Ok(Unit::Pending);
                }
                _ => return Err("invalid escape in a string"),
            };
            Ok(Unit::Byte(byte))
        }
        Escape::Unicode { digits, value } => {
            let digit = char::from(b)
                .to_digit(16)
                .ok_or("invalid \\u escape in a string")?;
            let value = value << 4 | digit;
            if digits == 3 {
                *escape = Escape::None;
                Ok(Unit::Code(value))
            } else {
                *escape = Escape::Unicode {
                    digits: digits + 1,
                    value,
                };
                Ok(Unit::Pending)
            }
        }
    }
}

/// The tarball's decoding: base64 state, size, and the first bytes for the gzip check.
#[derive(Debug, Default)]
struct TarballDecoder {
    base64: Base64,
    /// The first base64 error; decoding stops there.
    error: Option<String>,
    size: u64,
    head: [u8; 2],
    head_len: usize,
    /// The `data` string is closed.
    ended: bool,
}

impl TarballDecoder {
    /// Decodes a plain run of `data` (no quote, backslash or control character): whole
    /// quanta in bulk ([`Base64::push_quanta`]), the rest (a quantum split across
    /// pieces, padding, whitespace, errors) symbol by symbol.
    fn push_run(&mut self, run: &[u8], out: &mut Vec<u8>) {
        let mut rest = run;
        while self.error.is_none() {
            let used = self.base64.push_quanta(rest, out);
            rest = rest.get(used..).unwrap_or_default();
            let Some((&b, tail)) = rest.split_first() else {
                return;
            };
            if let Err(e) = self.base64.push(b, out) {
                self.error = Some(e);
            }
            rest = tail;
        }
    }

    fn push_code(&mut self, code: u32, out: &mut Vec<u8>) {
        // Non-ASCII code points are invalid symbols; their UTF-8 bytes say so, at the
        // offset the old whole-string decode reported.
        let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
        let mut utf8 = [0; 4];
        self.push_run(c.encode_utf8(&mut utf8).as_bytes(), out);
    }

    fn end(&mut self) {
        self.ended = true;
        if self.error.is_none()
            && let Err(e) = self.base64.finish()
        {
            self.error = Some(e);
        }
    }

    /// Accounts for bytes the decoder just appended to the caller's buffer.
    fn decoded(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        for &b in bytes.iter().take(2 - self.head_len) {
            if let Some(slot) = self.head.get_mut(self.head_len) {
                *slot = b;
                self.head_len += 1;
            }
        }
    }

    fn gzip(&self) -> bool {
        self.head_len == 2 && self.head == GZIP_MAGIC
    }

    fn rejected(&self) -> bool {
        self.error.is_some() || ((self.head_len == 2 || self.ended) && !self.gzip())
    }

    fn summary(self) -> Tarball {
        Tarball {
            size: self.size,
            gzip: self.gzip(),
            invalid_base64: self.error,
        }
    }
}

/// Bytes per step of [`plain_run`]'s wide scan.
const RUN_LANES: usize = 32;

/// Length of the prefix of `s` that a JSON string holds as is: no quote, backslash or
/// control character. Whole blocks are tested first with a test the compiler turns into
/// vector compares (a tarball's base64 is megabytes of such a run), the last block a byte
/// at a time.
fn plain_run(s: &[u8]) -> usize {
    let special = |c: u8| u8::from(c == b'"') | u8::from(c == b'\\') | u8::from(c < 0x20);
    let mut clear = 0;
    for block in s.chunks_exact(RUN_LANES) {
        if block.iter().fold(0, |any, &c| any | special(c)) != 0 {
            break;
        }
        clear += RUN_LANES;
    }
    let tail = s.get(clear..).unwrap_or_default();
    clear
        + tail
            .iter()
            .position(|&c| special(c) != 0)
            .unwrap_or(tail.len())
}

/// `INVALID` in [`SEXTETS`].
const INVALID: u8 = 0xff;

/// Base64 symbol → 6-bit value (standard alphabet).
const SEXTETS: [u8; 256] = {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < alphabet.len() {
        table[alphabet[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// An incremental decoder accepting what `STANDARD.decode(text.trim())` accepts: the
/// standard alphabet, canonical padding, no stray bits in the last symbol, whitespace only
/// at either end. Plain quanta go through the `base64` crate ([`Base64::push_quanta`]);
/// everything else, errors included, goes a symbol at a time ([`Base64::push`]). Messages
/// use the `base64` crate's wording; offsets count from the first symbol, as they did
/// when the trimmed string was decoded whole.
#[derive(Debug, Default)]
struct Base64 {
    /// The current quantum's raw symbols and their values.
    symbols: [u8; 4],
    values: [u8; 4],
    filled: usize,
    padding: usize,
    /// Symbols (and inner whitespace) read since the first symbol.
    offset: u64,
    started: bool,
    /// The first whitespace after the text began: allowed only if nothing else follows.
    trailing: Option<(u64, u8)>,
    /// A padded quantum ended the text.
    ended: bool,
    /// The `base64` crate refused a run in an unexpected way: no more bulk decoding.
    no_bulk: bool,
}

impl Base64 {
    /// Decodes the longest prefix of `input` made of whole quanta of plain symbols, when at
    /// a quantum boundary; returns its length. The `base64` crate does the work, which is
    /// much faster than a symbol at a time.
    fn push_quanta(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        if self.filled != 0 || self.trailing.is_some() || self.ended || self.no_bulk {
            return 0;
        }
        let mut whole = input.len() / 4 * 4;
        // The crate would take a padded last quantum as the end of the text; `push` must
        // see it, to refuse what follows. Padding before that is an error the crate finds.
        while whole >= 4
            && input
                .get(whole - 4..whole)
                .is_some_and(|q| q.contains(&b'='))
        {
            whole -= 4;
        }
        let before = out.len();
        let run = input.get(..whole).unwrap_or_default();
        // A vector decoder takes the run first (about five times faster here); a run it
        // refuses is decoded again below, where the `base64` crate finds what is wrong.
        let decoded = if base64_simd::STANDARD.decode_append(run, out).is_ok() {
            Ok(())
        } else {
            out.truncate(before);
            BASE64.decode_vec(run, out)
        };
        let valid = match decoded {
            Ok(()) => whole,
            Err(DecodeError::InvalidByte(at, _)) => {
                // Everything before the quantum holding the odd byte is plain symbols.
                out.truncate(before);
                let valid = at / 4 * 4;
                match BASE64.decode_vec(input.get(..valid).unwrap_or_default(), out) {
                    Ok(()) => valid,
                    Err(_) => {
                        self.no_bulk = true;
                        0
                    }
                }
            }
            // Not expected for whole unpadded quanta; going a symbol at a time from here
            // keeps the work linear (no retrying the same run) and finds the error.
            Err(_) => {
                self.no_bulk = true;
                0
            }
        };
        if valid == 0 {
            out.truncate(before);
        } else {
            self.started = true;
            self.offset += valid as u64;
        }
        valid
    }

    fn push(&mut self, b: u8, out: &mut Vec<u8>) -> Result<(), String> {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            if self.started {
                self.trailing.get_or_insert((self.offset, b));
                self.offset += 1;
            }
            return Ok(());
        }
        if let Some((at, space)) = self.trailing {
            return Err(invalid_symbol(space, at));
        }
        self.started = true;
        let at = self.offset;
        self.offset += 1;
        if self.ended {
            return Err(invalid_symbol(b, at));
        }
        let value = if b == b'=' {
            if self.filled < 2 {
                return Err(invalid_symbol(b, at));
            }
            self.padding += 1;
            0
        } else {
            let value = SEXTETS[usize::from(b)];
            if value == INVALID {
                return Err(invalid_symbol(b, at));
            }
            if self.padding > 0 {
                return Err("Invalid padding".to_owned());
            }
            value
        };
        self.symbols[self.filled] = b;
        self.values[self.filled] = value;
        self.filled += 1;
        if self.filled == 4 {
            self.filled = 0;
            let v = self.values;
            let n = u32::from(v[0]) << 18
                | u32::from(v[1]) << 12
                | u32::from(v[2]) << 6
                | u32::from(v[3]);
            let bytes = n.to_be_bytes();
            // The last symbol before the padding may not carry bits past the data.
            let (keep, last, stray) = match self.padding {
                0 => (3, 3, 0),
                1 => (2, 2, v[2] & 0b11),
                _ => (1, 1, v[1] & 0b1111),
            };
            if stray != 0 {
                let last_at = at - 3 + last as u64;
                return Err(format!(
                    "Invalid last symbol {}, offset {last_at}.",
                    self.symbols[last]
                ));
            }
            out.extend_from_slice(&bytes[1..=keep]);
            self.ended = self.padding > 0;
            self.padding = 0;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        if self.filled == 0 {
            Ok(())
        } else {
            Err("Invalid padding".to_owned())
        }
    }
}

fn invalid_symbol(b: u8, at: u64) -> String {
    format!("Invalid symbol {b}, offset {at}.")
}

/// A tarball frame, or the end of the tarball. A channel closed without [`Piece::End`]
/// fails the blob's body, so the store keeps nothing.
#[derive(Debug)]
enum Piece {
    Data(Bytes),
    End,
}

/// The scanner's side of the tarball stream.
#[derive(Debug)]
pub(crate) struct TarballSender {
    /// `None` once aborted, or once the store stopped listening.
    tx: Option<mpsc::Sender<Piece>>,
}

/// The blob store's side of the tarball stream.
#[derive(Debug)]
pub(crate) struct TarballReceiver {
    rx: mpsc::Receiver<Piece>,
}

/// A bounded tarball stream: the scan waits when the store falls behind.
pub(crate) fn tarball_channel() -> (TarballSender, TarballReceiver) {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    (TarballSender { tx: Some(tx) }, TarballReceiver { rx })
}

impl TarballSender {
    /// Sends decoded bytes; dropped when aborted or when the store has stopped (its
    /// error is reported by [`store_tarball`]).
    async fn send(&mut self, bytes: Bytes) {
        if let Some(tx) = &mut self.tx
            && tx.send(Piece::Data(bytes)).await.is_err()
        {
            self.tx = None;
        }
    }

    /// Fails the tarball's body: the store discards what it received. Dropping the sender
    /// without [`TarballSender::finish`] does the same.
    pub(crate) fn abort(&mut self) {
        self.tx = None;
    }

    /// Ends the tarball's body normally: the store commits it.
    pub(crate) async fn finish(mut self) {
        if let Some(tx) = &mut self.tx {
            // An error means the store stopped early; `store_tarball` reports why.
            let _ = tx.send(Piece::End).await;
        }
    }
}

/// Stores the tarball as it streams in: `None` when no byte arrives before the stream
/// ends (a document without a tarball), so nothing is stored for it. `at_most` bounds
/// its length when that is known, so the store can size its buffer.
pub(crate) async fn store_tarball(
    repo: &dyn Registry,
    mut receiver: TarballReceiver,
    at_most: Option<u64>,
) -> Result<Option<BlobInfo>, RegistryError> {
    let first = match receiver.rx.next().await {
        Some(Piece::Data(bytes)) => bytes,
        Some(Piece::End) | None => return Ok(None),
    };
    let rest = stream::unfold(Some(receiver.rx), |rx| async move {
        let mut rx = rx?;
        match rx.next().await {
            Some(Piece::Data(bytes)) => Some((Ok(Frame::data(bytes)), Some(rx))),
            Some(Piece::End) => None,
            None => Some((Err(BodyError::from("the publish was refused")), None)),
        }
    });
    let frames = stream::once(async move { Ok::<_, BodyError>(Frame::data(first)) }).chain(rest);
    let mut body: Body = StreamBody::new(frames).boxed_unsync();
    if let Some(limit) = at_most {
        body = body::at_most(body, limit);
    }
    repo.store_blob(body).await.map(Some)
}

/// Scans a `PUT {name}` body of at most `limit` bytes, sending the tarball to `tarball`
/// as it is decoded. After a syntax error the rest of the body is still read (and
/// dropped), so the client, which reads the answer only after sending, sees it.
pub(crate) async fn scan(
    mut body: Body,
    limit: usize,
    tarball: &mut TarballSender,
) -> Result<Scanned, FormatError> {
    let mut scanner = Scanner::new(SKELETON_LIMIT);
    let mut read = 0usize;
    let mut out = Vec::new();
    let mut failure = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| read_error(&*e, limit))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        read = read.saturating_add(data.len());
        if read > limit {
            return Err(too_large(limit));
        }
        if failure.is_some() {
            continue;
        }
        for piece in data.chunks(PIECE) {
            if let Err(e) = scanner.feed(piece, &mut out) {
                tarball.abort();
                failure = Some(e);
                break;
            }
            if scanner.tarball_rejected() {
                tarball.abort();
                out.clear();
            }
            if !out.is_empty() {
                tarball.send(Bytes::from(mem::take(&mut out))).await;
            }
        }
    }
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(scanner.finish()?),
    }
}

/// 413 for a body past `limit` bytes.
pub(crate) fn too_large(limit: usize) -> FormatError {
    FormatError::PayloadTooLarge {
        limit: u64::try_from(limit).unwrap_or(u64::MAX),
    }
}

/// A body that failed to arrive: 413 when the node's own length limit cut it.
pub(crate) fn read_error(err: &(dyn std::error::Error + 'static), limit: usize) -> FormatError {
    if body::is_too_large(err) {
        too_large(limit)
    } else {
        FormatError::BadRequest(format!("could not read request body: {err}"))
    }
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
