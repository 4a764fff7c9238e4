//! State dicts in PyTorch's `torch.save` file (the zip form: `NAME/data.pkl`, a pickle
//! that names each tensor's storage by a persistent id, and `NAME/data/<key>`, the raw
//! little-endian storages), read and written without Python.
//!
//! Reading never runs pickle code: a small unpickler understands the opcodes that
//! `torch.save(model.state_dict())` emits and only the globals a state dict needs
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter`, `torch.<Type>Storage`); any other global (a class,
//! `os.system`, ...) is refused by name before anything is built from it. The legacy
//! (pre-1.6) non-zip form is refused with how to re-save it.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

use tch::{Kind, Tensor};
use thiserror::Error;

/// A `torch.save` file that cannot be read or written.
#[derive(Debug, Error)]
pub enum TorchFileError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a zip-based `torch.save` file (legacy format, or not PyTorch's at all).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What it is instead.
        message: String,
    },
    /// The pickle names a global that a state dict does not need; nothing was run.
    #[error(
        "{path}: refusing to load: the pickle references the global `{global}`, which is \
         not part of a plain state dict (allowed: collections.OrderedDict, \
         torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.*Storage); \
         nothing was executed. Save the tensors alone: torch.save(model.state_dict(), path)"
    )]
    ForbiddenGlobal {
        /// The file.
        path: String,
        /// `module.name` as the pickle spells it.
        global: String,
    },
    /// The pickle is malformed or uses something this reader does not understand.
    #[error("{path}: data.pkl at byte {offset}: {message}")]
    Pickle {
        /// The file.
        path: String,
        /// Offset of the opcode in data.pkl.
        offset: usize,
        /// What is wrong.
        message: String,
    },
    /// A tensor is inconsistent with its storage (or cannot be written).
    #[error("{path}: tensor {name}: {message}")]
    Tensor {
        /// The file.
        path: String,
        /// The state dict key.
        name: String,
        /// What is wrong.
        message: String,
    },
}

/// The storage classes of `torch.save` and the element kinds they hold.
const STORAGES: [(&str, Kind); 10] = [
    ("FloatStorage", Kind::Float),
    ("DoubleStorage", Kind::Double),
    ("HalfStorage", Kind::Half),
    ("BFloat16Storage", Kind::BFloat16),
    ("LongStorage", Kind::Int64),
    ("IntStorage", Kind::Int),
    ("ShortStorage", Kind::Int16),
    ("CharStorage", Kind::Int8),
    ("ByteStorage", Kind::Uint8),
    ("BoolStorage", Kind::Bool),
];

/// The callables a state dict pickle may name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Kind),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        match (module, name) {
            ("collections", "OrderedDict") => Some(Self::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Some(Self::RebuildTensorV2),
            ("torch._utils", "_rebuild_parameter") => Some(Self::RebuildParameter),
            ("torch", s) => STORAGES
                .iter()
                .find(|(n, _)| *n == s)
                .map(|(_, k)| Self::Storage(*k)),
            _ => None,
        }
    }
}

/// A tensor as the pickle describes it: a view into a storage.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    key: String,
    kind: Kind,
    numel: i64,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage { kind: Kind, key: String, numel: i64 },
    Tensor(TensorRef),
}

impl Value {
    /// Roughly the bytes a copy of this value takes.
    fn weight(&self) -> usize {
        std::mem::size_of::<Value>()
            + match self {
                Value::Str(s) => s.len(),
                Value::Bytes(b) => b.len(),
                Value::Tuple(v) | Value::List(v) => v.iter().map(Value::weight).sum(),
                Value::Dict(kv) => kv.iter().map(|(k, v)| k.weight() + v.weight()).sum(),
                Value::Storage { key, .. } => key.len(),
                Value::Tensor(t) => t.key.len() + 8 * (t.size.len() + t.stride.len()),
                _ => 0,
            }
    }

    /// Whether the value nests at most `levels` containers deep.
    fn nests_within(&self, levels: usize) -> bool {
        let within = |v: &Value| levels > 0 && v.nests_within(levels - 1);
        match self {
            Value::Tuple(v) | Value::List(v) => v.iter().all(within),
            Value::Dict(kv) => kv.iter().all(|(k, v)| within(k) && within(v)),
            _ => true,
        }
    }
}

/// Containers nest at most this deep (a state dict needs a handful of levels); deeper
/// ones, a few bytes of pickle each, would overflow the stack when dropped.
const MAX_NESTING: usize = 64;

/// Bytes that memo fetches, DUP and memoizing may copy, beyond [`COPIES_PER_BYTE`] per
/// byte of pickle: each copy of a few bytes of pickle may double a value.
const COPY_ALLOWANCE: usize = 1 << 24;
/// Bytes of copies allowed per byte of pickle (PyTorch's own files copy a few).
const COPIES_PER_BYTE: usize = 64;

/// The pickle machine: a stack, marks and a memo; values are data only.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Bytes copied so far (memo, DUP), against the budget.
    copied: usize,
    path: &'a str,
}

impl<'a> Unpickler<'a> {
    fn err(&self, message: impl Into<String>) -> TorchFileError {
        TorchFileError::Pickle {
            path: self.path.to_string(),
            offset: self.op_at,
            message: message.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TorchFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err("truncated pickle"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, TorchFileError> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N], TorchFileError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn line(&mut self) -> Result<String, TorchFileError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated line"))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }

    fn text(&mut self, n: usize) -> Result<Value, TorchFileError> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| self.err("string is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value, TorchFileError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, TorchFileError> {
        let at = self.marks.pop().ok_or_else(|| self.err("no mark"))?;
        if at > self.stack.len() {
            return Err(self.err("mark above the stack"));
        }
        Ok(self.stack.split_off(at))
    }

    fn top(&mut self) -> Result<&mut Value, TorchFileError> {
        match self.stack.last_mut() {
            Some(v) => Ok(v),
            None => Err(TorchFileError::Pickle {
                path: self.path.to_string(),
                offset: self.op_at,
                message: "stack underflow".into(),
            }),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), TorchFileError> {
        let g = Global::resolve(module, name).ok_or_else(|| TorchFileError::ForbiddenGlobal {
            path: self.path.to_string(),
            global: format!("{module}.{name}"),
        })?;
        self.stack.push(Value::Global(g));
        Ok(())
    }

    /// Charges a copy of `weight` bytes to the budget: a pickle may not copy values over
    /// and over until they fill the memory.
    fn charge(&mut self, weight: usize) -> Result<(), TorchFileError> {
        self.copied = self.copied.saturating_add(weight);
        let budget = COPY_ALLOWANCE.saturating_add(self.data.len().saturating_mul(COPIES_PER_BYTE));
        if self.copied > budget {
            return Err(self.err(format!(
                "the pickle copies more than {budget} bytes of values (memo fetches or DUP \
                 repeated): not a torch.save state dict"
            )));
        }
        Ok(())
    }

    /// A copy of the top of the stack, charged.
    fn copy_top(&mut self) -> Result<Value, TorchFileError> {
        let weight = self.top()?.weight();
        self.charge(weight)?;
        Ok(self.top()?.clone())
    }

    /// Refuses items that would nest containers deeper than [`MAX_NESTING`].
    fn nestable<'v>(
        &self,
        items: impl IntoIterator<Item = &'v Value>,
    ) -> Result<(), TorchFileError> {
        if items.into_iter().all(|v| v.nests_within(MAX_NESTING - 1)) {
            Ok(())
        } else {
            Err(self.err(format!(
                "containers nest deeper than {MAX_NESTING}: not a torch.save state dict"
            )))
        }
    }

    fn memo_put(&mut self, key: u32) -> Result<(), TorchFileError> {
        let v = self.copy_top()?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), TorchFileError> {
        let weight = self
            .memo
            .get(&key)
            .ok_or_else(|| self.err(format!("memo key {key} is not set")))?
            .weight();
        self.charge(weight)?;
        let v = self.memo[&key].clone();
        self.stack.push(v);
        Ok(())
    }

    /// Applies an allowed callable to its arguments.
    fn reduce(&self, f: Value, args: Value) -> Result<Value, TorchFileError> {
        let Value::Tuple(args) = args else {
            return Err(self.err("REDUCE arguments are not a tuple"));
        };
        match f {
            Value::Global(Global::OrderedDict) => match args.as_slice() {
                [] => Ok(Value::Dict(Vec::new())),
                [Value::List(items)] => items
                    .iter()
                    .map(|p| match p {
                        Value::Tuple(kv) if kv.len() == 2 => Ok((kv[0].clone(), kv[1].clone())),
                        _ => Err(self.err("OrderedDict item is not a pair")),
                    })
                    .collect::<Result<_, _>>()
                    .map(Value::Dict),
                _ => Err(self.err("unexpected OrderedDict arguments")),
            },
            Value::Global(Global::RebuildTensorV2) => {
                if !(6..=7).contains(&args.len()) {
                    return Err(self.err("_rebuild_tensor_v2 takes 6 or 7 arguments"));
                }
                let Value::Storage { kind, key, numel } = &args[0] else {
                    return Err(self.err("_rebuild_tensor_v2: first argument is not a storage"));
                };
                let offset = self.int(&args[1])?;
                let size = self.ints(&args[2])?;
                let stride = self.ints(&args[3])?;
                if size.len() != stride.len() {
                    return Err(self.err("size and stride differ in length"));
                }
                match args.get(6) {
                    None | Some(Value::None) => {}
                    Some(Value::Dict(d)) if d.is_empty() => {}
                    Some(_) => {
                        return Err(self.err(
                            "tensor metadata (a tensor subclass or special flags) is not supported",
                        ))
                    }
                }
                Ok(Value::Tensor(TensorRef {
                    key: key.clone(),
                    kind: *kind,
                    numel: *numel,
                    offset,
                    size,
                    stride,
                }))
            }
            Value::Global(Global::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) if args.len() == 3 => Ok(t.clone()),
                _ => Err(self.err("_rebuild_parameter: unexpected arguments")),
            },
            Value::Global(g) => Err(self.err(format!("{g:?} cannot be called"))),
            _ => Err(self.err("REDUCE on something that is not an allowed global")),
        }
    }

    fn int(&self, v: &Value) -> Result<i64, TorchFileError> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => Err(self.err(format!("expected an integer, got {v:?}"))),
        }
    }

    fn ints(&self, v: &Value) -> Result<Vec<i64>, TorchFileError> {
        match v {
            Value::Tuple(items) | Value::List(items) => items.iter().map(|i| self.int(i)).collect(),
            _ => Err(self.err(format!("expected a tuple of integers, got {v:?}"))),
        }
    }

    /// `('storage', torch.<T>Storage, key, location, numel)` -> a storage.
    fn persistent_load(&self, pid: Value) -> Result<Value, TorchFileError> {
        match pid {
            Value::Tuple(t) => match t.as_slice() {
                [Value::Str(tag), Value::Global(Global::Storage(kind)), Value::Str(key), Value::Str(_location), Value::Int(numel)]
                    if tag == "storage" =>
                {
                    Ok(Value::Storage {
                        kind: *kind,
                        key: key.clone(),
                        numel: *numel,
                    })
                }
                _ => Err(self.err(format!("unsupported persistent id {t:?}"))),
            },
            other => Err(self.err(format!("unsupported persistent id {other:?}"))),
        }
    }

    fn run(mut self) -> Result<Value, TorchFileError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(self.err(format!("pickle protocol {proto} is unknown")));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                _ => {
                    let known = self.containers(op)? || self.scalars(op)? || self.references(op)?;
                    if !known {
                        return Err(self.err(format!(
                            "opcode 0x{op:02x} ({:?}) is not used by torch.save for a state dict",
                            op as char
                        )));
                    }
                }
            }
        }
    }

    /// Tuples, lists and dicts (marks, building, filling); `false` for another family's op.
    fn containers(&mut self, op: u8) -> Result<bool, TorchFileError> {
        match op {
            b'(' => self.marks.push(self.stack.len()),
            b')' => self.stack.push(Value::Tuple(Vec::new())),
            b't' => {
                let items = self.pop_mark()?;
                self.nestable(&items)?;
                self.stack.push(Value::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n {
                    return Err(self.err("stack underflow"));
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.nestable(&items)?;
                self.stack.push(Value::Tuple(items));
            }
            b']' => self.stack.push(Value::List(Vec::new())),
            b'l' => {
                let items = self.pop_mark()?;
                self.nestable(&items)?;
                self.stack.push(Value::List(items));
            }
            b'a' => {
                let v = self.pop()?;
                self.nestable([&v])?;
                match self.top()? {
                    Value::List(l) => l.push(v),
                    _ => return Err(self.err("APPEND to something that is not a list")),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.nestable(&items)?;
                match self.top()? {
                    Value::List(l) => l.extend(items),
                    _ => return Err(self.err("APPENDS to something that is not a list")),
                }
            }
            b'}' => self.stack.push(Value::Dict(Vec::new())),
            b'd' => {
                let items = self.pop_mark()?;
                self.nestable(&items)?;
                let d = pairs(items).ok_or_else(|| self.err("odd number of dict items"))?;
                self.stack.push(Value::Dict(d));
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.nestable([&k, &v])?;
                match self.top()? {
                    Value::Dict(d) => d.push((k, v)),
                    _ => return Err(self.err("SETITEM on something that is not a dict")),
                }
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.nestable(&items)?;
                let kv = pairs(items).ok_or_else(|| self.err("odd number of dict items"))?;
                match self.top()? {
                    Value::Dict(d) => d.extend(kv),
                    _ => return Err(self.err("SETITEMS on something that is not a dict")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// None, booleans, integers, floats and strings; `false` for another family's op.
    fn scalars(&mut self, op: u8) -> Result<bool, TorchFileError> {
        match op {
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'J' => {
                let v = i32::from_le_bytes(self.le()?);
                self.stack.push(Value::Int(v as i64));
            }
            b'K' => {
                let v = self.u8()?;
                self.stack.push(Value::Int(v as i64));
            }
            b'M' => {
                let v = u16::from_le_bytes(self.le()?);
                self.stack.push(Value::Int(v as i64));
            }
            0x8a => {
                let n = self.u8()? as usize;
                if n > 8 {
                    return Err(self.err("integer wider than 64 bits"));
                }
                let b = self.take(n)?;
                let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                    [0xffu8; 8]
                } else {
                    [0u8; 8]
                };
                buf[..n].copy_from_slice(b);
                self.stack.push(Value::Int(i64::from_le_bytes(buf)));
            }
            b'G' => {
                let v = f64::from_be_bytes(self.le()?);
                self.stack.push(Value::Float(v));
            }
            b'X' => {
                let n = u32::from_le_bytes(self.le()?) as usize;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            0x8c => {
                let n = self.u8()? as usize;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            0x8d => {
                let n = u64::from_le_bytes(self.le()?) as usize;
                let v = self.text(n)?;
                self.stack.push(v);
            }
            // Python 2 str (a state dict saved under Python 2 has them as keys).
            b'U' | b'T' | b'C' | b'B' => {
                let n = if matches!(op, b'U' | b'C') {
                    self.u8()? as usize
                } else {
                    u32::from_le_bytes(self.le()?) as usize
                };
                let b = self.take(n)?.to_vec();
                self.stack.push(match (op, String::from_utf8(b)) {
                    (b'U' | b'T', Ok(s)) => Value::Str(s),
                    (_, Ok(s)) => Value::Bytes(s.into_bytes()),
                    (_, Err(e)) => Value::Bytes(e.into_bytes()),
                });
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The memo, stack housekeeping, globals, reductions, storages and BUILD; `false` for
    /// another family's op.
    fn references(&mut self, op: u8) -> Result<bool, TorchFileError> {
        match op {
            b'q' => {
                let k = self.u8()? as u32;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = u32::from_le_bytes(self.le()?);
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len() as u32;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.u8()? as u32;
                self.memo_get(k)?;
            }
            b'j' => {
                let k = u32::from_le_bytes(self.le()?);
                self.memo_get(k)?;
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.copy_top()?;
                self.stack.push(v);
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(&module, &name)?;
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module, name) {
                    (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                    _ => return Err(self.err("STACK_GLOBAL operands are not strings")),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = self.reduce(f, args)?;
                self.stack.push(v);
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent_load(pid)?;
                self.stack.push(v);
            }
            b'b' => {
                // The state of an OrderedDict (its `_metadata`) or of a tensor (none
                // for plain ones): nothing the tensors need.
                let _state = self.pop()?;
                match self.top()? {
                    Value::Dict(_) | Value::Tensor(_) => {}
                    _ => return Err(self.err("BUILD on something that is not a dict")),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if items.len() % 2 != 0 {
        return None;
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> TorchFileError + '_ {
    move |source| TorchFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a state dict from a `torch.save` file, in the file's order. Tensors come back
/// contiguous, on the CPU, of the dtype they were saved with.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, TorchFileError> {
    let p = path.display().to_string();
    let format = |message: String| TorchFileError::Format {
        path: p.clone(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let archive_len = file.metadata().map_err(io_err(path))?.len();
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(io_err(path))?;
    if n < 4 || magic != *b"PK\x03\x04" {
        return Err(format(if magic[0] == 0x80 {
            "the legacy torch.save format (PyTorch < 1.6, or \
             _use_new_zipfile_serialization=False) is not supported; re-save it with a recent \
             PyTorch: torch.save(torch.load(p, weights_only=True), p)"
                .into()
        } else {
            "not a torch.save file (no zip archive)".into()
        }));
    }
    file.rewind().map_err(io_err(path))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| format(format!("not a readable zip archive: {e}")))?;
    // As PyTorch: every record lives in the folder of the first entry.
    let first = zip
        .by_index(0)
        .map_err(|e| format(e.to_string()))?
        .name()
        .to_string();
    let prefix = first
        .split_once('/')
        .map(|(d, _)| d.to_string())
        .ok_or_else(|| format(format!("zip entry {first:?} is not in a folder")))?;
    let mut record = |name: &str| -> Result<Option<Vec<u8>>, TorchFileError> {
        let full = format!("{prefix}/{name}");
        let mut f = match zip.by_name(&full) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(format(format!("{full}: {e}"))),
        };
        // The entry's size is the archive's claim: never reserve more than the file holds.
        let mut buf = Vec::with_capacity(f.size().min(archive_len) as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| format(format!("{full}: {e}")))?;
        Ok(Some(buf))
    };
    if let Some(order) = record("byteorder")? {
        if order != b"little" {
            return Err(format(format!(
                "byte order {:?} is not supported (only little-endian)",
                String::from_utf8_lossy(&order)
            )));
        }
    }
    let pickle = record("data.pkl")?
        .ok_or_else(|| format(format!("no {prefix}/data.pkl: not a torch.save file")))?;
    let root = Unpickler {
        data: &pickle,
        pos: 0,
        op_at: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
        path: &p,
    }
    .run()?;
    let Value::Dict(items) = root else {
        return Err(format(
            "the pickle does not hold a dict of tensors (save model.state_dict())".into(),
        ));
    };
    let mut storages: HashMap<String, Tensor> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(format(format!("a state dict key is not a string: {k:?}")));
        };
        let Value::Tensor(t) = v else {
            return Err(format(format!(
                "{name} is not a tensor (a checkpoint that wraps the state dict? save \
                 model.state_dict() itself)"
            )));
        };
        let bad = |message: String| TorchFileError::Tensor {
            path: p.clone(),
            name: name.clone(),
            message,
        };
        if !storages.contains_key(&t.key) {
            let bytes = record(&format!("data/{}", t.key))?
                .ok_or_else(|| bad(format!("storage data/{} is missing", t.key)))?;
            storages.insert(t.key.clone(), storage(&t, &bytes).map_err(bad)?);
        }
        let tensor = view(&t, &storages[&t.key]).map_err(bad)?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// The storage `t` lives in, from its record's bytes (which must hold its elements).
fn storage(t: &TensorRef, bytes: &[u8]) -> Result<Tensor, String> {
    let want = usize::try_from(t.numel)
        .ok()
        .and_then(|n| n.checked_mul(t.kind.elt_size_in_bytes()));
    let Some(want) = want.filter(|&w| w <= bytes.len()) else {
        return Err(format!(
            "storage data/{} holds {} bytes, too few for {} elements of {:?}",
            t.key,
            bytes.len(),
            t.numel,
            t.kind
        ));
    };
    Tensor::f_from_data_size(&bytes[..want], &[t.numel], t.kind).map_err(|e| e.to_string())
}

/// `t`'s view of `storage`, copied out, after checking that it stays inside it.
fn view(t: &TensorRef, storage: &Tensor) -> Result<Tensor, String> {
    if t.size.iter().chain(&t.stride).any(|&x| x < 0) || t.offset < 0 {
        return Err("negative size, stride or offset".into());
    }
    // The last element a view reaches must lie inside its storage.
    if !t.size.contains(&0) {
        // In i128: sizes and strides come from the file and may be absurd.
        let last = t.offset as i128
            + t.size
                .iter()
                .zip(&t.stride)
                .map(|(&n, &s)| (n as i128 - 1) * s as i128)
                .sum::<i128>();
        if last >= t.numel as i128 {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches past its storage of {} elements",
                t.offset, t.size, t.stride, t.numel
            ));
        }
    }
    storage
        .f_as_strided(&t.size, &t.stride, Some(t.offset))
        .and_then(|v| v.f_contiguous())
        .map_err(|e| e.to_string())
}

/// The pickle of a state dict as `torch.save` writes it (protocol 2), tensor `i` in
/// storage `i`.
fn state_dict_pickle(tensors: &[(String, Tensor)], kinds: &[&str]) -> Vec<u8> {
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: i64) {
        if (0..256).contains(&v) {
            out.extend([b'K', v as u8]);
        } else if (0..65536).contains(&v) {
            out.push(b'M');
            out.extend((v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            out.push(b'J');
            out.extend((v as i32).to_le_bytes());
        } else {
            out.extend([0x8a, 8]);
            out.extend(v.to_le_bytes());
        }
    }
    fn ints(out: &mut Vec<u8>, vs: &[i64]) {
        out.push(b'(');
        for &v in vs {
            int(out, v);
        }
        out.push(b't');
    }
    let ordered_dict = |out: &mut Vec<u8>| {
        out.extend(b"ccollections\nOrderedDict\n)R");
    };
    let mut out = vec![0x80, 2];
    ordered_dict(&mut out);
    out.push(b'(');
    for (i, ((name, t), storage)) in tensors.iter().zip(kinds).enumerate() {
        unicode(&mut out, name);
        out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        out.push(b'(');
        unicode(&mut out, "storage");
        out.extend(format!("ctorch\n{storage}\n").as_bytes());
        unicode(&mut out, &i.to_string());
        unicode(&mut out, "cpu");
        int(&mut out, t.numel() as i64);
        out.extend(b"tQ");
        int(&mut out, 0);
        let size = t.size();
        ints(&mut out, &size);
        // Contiguous strides.
        let mut stride = vec![1i64; size.len()];
        for d in (0..size.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * size[d + 1].max(1);
        }
        ints(&mut out, &stride);
        out.push(0x89);
        ordered_dict(&mut out);
        out.extend(b"tR");
    }
    out.extend(b"u.");
    out
}

/// Writes `tensors` as `torch.save(state_dict)` does (zip form, storages 64-byte
/// aligned), readable by `torch.load(path, weights_only=True)`; the file is synced.
pub fn write_state_dict(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), TorchFileError> {
    let p = path.display().to_string();
    let mut kinds = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let kind = t.kind();
        let storage = STORAGES
            .iter()
            .find(|(_, k)| *k == kind)
            .map(|(s, _)| *s)
            .ok_or_else(|| TorchFileError::Tensor {
                path: p.clone(),
                name: name.clone(),
                message: format!("dtype {kind:?} cannot be saved"),
            })?;
        kinds.push(storage);
    }
    let zip_err = |e: zip::result::ZipError| TorchFileError::Format {
        path: p.clone(),
        message: format!("writing the zip archive: {e}"),
    };
    let file = std::fs::File::create(path).map_err(io_err(path))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = |len: usize| {
        zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(len as u64 >= u32::MAX as u64)
    };
    let pickle = state_dict_pickle(tensors, &kinds);
    let entry = |zip: &mut zip::ZipWriter<_>, name: &str, bytes: &[u8], align: u16| {
        zip.start_file_aligned(format!("archive/{name}"), opts(bytes.len()), align)
            .map_err(zip_err)?;
        zip.write_all(bytes).map_err(io_err(path))
    };
    entry(&mut zip, "data.pkl", &pickle, 1)?;
    entry(&mut zip, "byteorder", b"little", 1)?;
    for (i, (name, t)) in tensors.iter().enumerate() {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel())
            .map_err(|e| TorchFileError::Tensor {
                path: p.clone(),
                name: name.clone(),
                message: e.to_string(),
            })?;
        // torch.save aligns storages to 64 bytes (so that they can be memory-mapped).
        entry(&mut zip, &format!("data/{i}"), &bytes, 64)?;
    }
    entry(&mut zip, "version", b"3\n", 1)?;
    let w = zip.finish().map_err(zip_err)?;
    let file = w.into_inner().map_err(|e| io_err(path)(e.into_error()))?;
    file.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(t: &Tensor) -> Vec<u8> {
        let mut b = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.contiguous().copy_data_u8(&mut b, t.numel());
        b
    }

    #[test]
    fn written_state_dicts_read_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        let f = Tensor::randn([3, 4], tch::kind::FLOAT_CPU);
        let tensors = vec![
            ("a.weight".to_string(), f.tr()), // a non-contiguous view is written contiguous
            ("b".to_string(), f.to_kind(Kind::Half)),
            ("c".to_string(), f.to_kind(Kind::BFloat16)),
            ("n".to_string(), Tensor::from(7i64)), // 0-d
            ("big".to_string(), Tensor::from_slice(&[1i64 << 40, -3])),
            (
                "empty".to_string(),
                Tensor::zeros([0, 5], tch::kind::FLOAT_CPU),
            ),
        ];
        write_state_dict(&path, &tensors).unwrap();
        let back = read_state_dict(&path).unwrap();
        assert_eq!(back.len(), tensors.len());
        for ((n0, t0), (n1, t1)) in tensors.iter().zip(&back) {
            assert_eq!(n0, n1);
            assert_eq!(t0.kind(), t1.kind(), "{n0}");
            assert_eq!(t0.size(), t1.size(), "{n0}");
            assert_eq!(bits(t0), bits(t1), "{n0}");
        }
    }

    fn unpickle(data: &[u8]) -> Result<Value, TorchFileError> {
        Unpickler {
            data,
            pos: 0,
            op_at: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            copied: 0,
            path: "test",
        }
        .run()
    }

    #[test]
    fn foreign_globals_are_refused_by_name() {
        // pickle.dumps of an object whose __reduce__ is (os.system, ('touch x',)), protocol 2.
        let e =
            unpickle(b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00touch xq\x01\x85q\x02Rq\x03.")
                .unwrap_err()
                .to_string();
        assert!(
            e.contains("posix.system") && e.contains("nothing was executed"),
            "{e}"
        );
        // Protocol 4 spells globals with STACK_GLOBAL.
        let e = unpickle(b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("builtins.eval"), "{e}");
        let e = unpickle(b"\x80\x02cargparse\nNamespace\n)\x81.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("argparse.Namespace"), "{e}");
    }

    /// `arange(12)` saved, then its pickle edited by `(from, to)` substitutions.
    fn edited(
        dir: &Path,
        edits: &[(&[u8], &[u8])],
    ) -> Result<Vec<(String, Tensor)>, TorchFileError> {
        let path = dir.join("v.pt");
        write_state_dict(
            &path,
            &[("s".to_string(), Tensor::arange(12, tch::kind::FLOAT_CPU))],
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let mut read = |name: &str| {
            let mut b = Vec::new();
            zip.by_name(name).unwrap().read_to_end(&mut b).unwrap();
            b
        };
        let mut pkl = read("archive/data.pkl");
        let storage = read("archive/data/0");
        for (from, to) in edits {
            let at = pkl.windows(from.len()).position(|w| w == *from).unwrap();
            pkl.splice(at..at + from.len(), to.iter().copied());
        }
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let o =
            zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        for (name, b) in [("archive/data.pkl", &pkl), ("archive/data/0", &storage)] {
            w.start_file(name, o).unwrap();
            w.write_all(b).unwrap();
        }
        w.finish().unwrap();
        read_state_dict(&path)
    }

    #[test]
    fn views_into_a_shared_storage_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        // base[2:8].view(2, 3)[:, ::2]: offset 2, size (2, 2), stride (3, 2).
        let t = &edited(
            dir.path(),
            &[(b"tQK\x00(K\x0ct(K\x01t", b"tQK\x02(K\x02K\x02t(K\x03K\x02t")],
        )
        .unwrap()[0]
            .1;
        let base = Tensor::arange(12, tch::kind::FLOAT_CPU);
        let want = base.narrow(0, 2, 6).view([2, 3]).slice(1, 0, 3, 2);
        assert!(t.equal(&want), "{t:?}");
    }

    #[test]
    fn storages_and_views_out_of_bounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // A storage claiming i64::MAX elements.
        let e = edited(
            dir.path(),
            &[(
                b"cpuK\x0ct",
                b"cpu\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7ft",
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("too few"), "{e}");
        // A view past the end of its storage.
        let e = edited(dir.path(), &[(b"tQK\x00(K\x0ct", b"tQK\x01(K\x0ct")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("reaches past"), "{e}");
    }

    /// A pickle that copies a value over and over, each copy doubling it (`]` then DUP and
    /// APPEND repeated; and a memo fetch repeated), or nests lists thousands deep, is
    /// refused in milliseconds, not after filling the memory or overflowing the stack.
    #[test]
    fn pickle_bombs_are_refused() {
        let run = |pickle: Vec<u8>| {
            let start = std::time::Instant::now();
            let e = unpickle(&pickle).unwrap_err().to_string();
            assert!(start.elapsed() < std::time::Duration::from_secs(1), "{e}");
            e
        };
        let doubling = [&[0x80, 2, b']'][..], &b"2a".repeat(64), b"."].concat();
        assert!(run(doubling).contains("copies more than"));
        let fetched = [
            &[0x80, 2][..],
            b"X\x00\x00\x10\x00",
            &[0u8; 1 << 20],
            b"q\x00",
            &b"h\x00".repeat(1000),
            b".",
        ]
        .concat();
        assert!(run(fetched).contains("copies more than"));
        let deep = [
            &[0x80, 2][..],
            &b"]".repeat(10_000),
            &b"a".repeat(9_999),
            b".",
        ]
        .concat();
        assert!(run(deep).contains("nest deeper than"));
    }

    fn fuzz_seeds() -> Vec<Vec<u8>> {
        upcycle_files::fuzz::seeds(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz/pt"))
    }

    /// Fuzzing, seeded, a fixed number of inputs (no fuzzing toolchain needed):
    /// whole `.pt` files mutated (the zip layer), and their pickles mutated inside a valid
    /// archive beside the first seed's storages (the unpickler and the rebuilding of views).
    /// No input may panic, hang (2 s each) or allocate above the test binary's bound; the
    /// seeds are PyTorch's own files in `tests/fuzz/pt/`.
    #[test]
    fn fuzz_pt_reader() {
        let seeds = fuzz_seeds();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.pt");
        let limit = std::time::Duration::from_secs(2);
        upcycle_files::fuzz::run("pt file", &seeds, 19_001, 1000, limit, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            let _ = read_state_dict(&path);
        });
        let entries = |archive: &[u8]| {
            let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive.to_vec())).unwrap();
            let names: Vec<String> = zip.file_names().map(String::from).collect();
            names
                .into_iter()
                .map(|n| {
                    let mut b = Vec::new();
                    zip.by_name(&n).unwrap().read_to_end(&mut b).unwrap();
                    (n, b)
                })
                .collect::<Vec<_>>()
        };
        let pickles: Vec<Vec<u8>> = seeds
            .iter()
            .map(|s| {
                entries(s)
                    .into_iter()
                    .find(|(n, _)| n.ends_with("/data.pkl"))
                    .unwrap()
                    .1
            })
            .collect();
        let storages: Vec<_> = entries(&seeds[0])
            .into_iter()
            .filter(|(n, _)| !n.ends_with("/data.pkl"))
            .collect();
        upcycle_files::fuzz::run("pickle", &pickles, 19_002, 2000, limit, |pkl| {
            let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
            let o = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            w.start_file("archive/data.pkl", o).unwrap();
            w.write_all(pkl).unwrap();
            for (name, b) in &storages {
                w.start_file(format!("archive/{}", name.split_once('/').unwrap().1), o)
                    .unwrap();
                w.write_all(b).unwrap();
            }
            w.finish().unwrap();
            let _ = read_state_dict(&path);
        });
    }
}
