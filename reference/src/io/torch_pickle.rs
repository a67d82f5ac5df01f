//! An allow-list unpickler for the `data.pkl` of a `torch.save` zip: it understands the
//! opcodes a state dict uses and the few globals it names (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`, and the f32 / f16 /
//! bf16 storage types), and refuses every other global by name. It never executes anything:
//! a "call" of an allowed global builds a plain value.
//!
//! Written here rather than taken from a crate: `serde-pickle` refuses GLOBAL/REDUCE and
//! persistent ids (what torch uses), and the readers that handle torch's pickles (candle's)
//! come inside a whole tensor framework. This one is small, bounded (nesting depth, memo
//! copies, string lengths checked against the input) and fuzzed (`reference/tests/torch_bin.rs`).

use std::collections::HashMap;

/// The storage element types a state dict may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
    F32,
    F16,
    BF16,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 => 2,
        }
    }
}

/// The allowed globals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageDtype),
}

/// A view of a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub dtype: StorageDtype,
    /// The storage's entry name under `data/`.
    pub key: String,
    /// Elements in the storage.
    pub numel: u64,
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// What the unpickler builds.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Global),
    Storage {
        dtype: StorageDtype,
        key: String,
        numel: u64,
    },
    Tensor(TensorRef),
    Mark,
}

/// Values nest at most this deep (a state dict needs 4); deeper input is refused, so neither
/// building nor dropping a value can overflow the stack.
const MAX_DEPTH: usize = 32;
/// Values copied out of the memo, in nodes, across one file.
const MAX_MEMO_COPIES: usize = 50_000_000;

impl Value {
    fn depth(&self) -> usize {
        let kids = match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::depth).max(),
            Value::Dict(v) => v.iter().map(|(k, x)| k.depth().max(x.depth())).max(),
            _ => return 0,
        };
        1 + kids.unwrap_or(0)
    }

    fn nodes(&self) -> usize {
        1 + match self {
            Value::Tuple(v) | Value::List(v) => v.iter().map(Value::nodes).sum(),
            Value::Dict(v) => v.iter().map(|(k, x)| k.nodes() + x.nodes()).sum(),
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage { .. } => "storage",
            Value::Tensor(_) => "tensor",
            Value::Mark => "mark",
        }
    }
}

/// Maps `module.name` to an allowed global, or refuses it by name.
fn global(module: &str, name: &str) -> Result<Global, String> {
    Ok(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "FloatStorage") => Global::Storage(StorageDtype::F32),
        ("torch", "HalfStorage") => Global::Storage(StorageDtype::F16),
        ("torch", "BFloat16Storage") => Global::Storage(StorageDtype::BF16),
        _ => {
            return Err(format!(
                "pickle names the global {module}.{name}, which a state dict never needs; refusing to load"
            ))
        }
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    copies: usize,
}

/// Unpickles `data` with the allow-list; the result is the pickled object (for a state dict,
/// a [`Value::Dict`] of names to [`Value::Tensor`]). Errors are messages; the caller adds where.
pub fn unpickle(data: &[u8]) -> Result<Value, String> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        copies: 0,
    };
    loop {
        let at = m.pos;
        let op = m.take(1)?[0];
        if op == b'.' {
            return m.pop();
        }
        m.step(op)
            .map_err(|e| format!("at byte {at} (opcode 0x{op:02x}): {e}"))?;
    }
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(format!(
                "pickle ends early (needs {n} more bytes at byte {})",
                self.pos
            ));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<usize, String> {
        Ok(self.take(1)?[0] as usize)
    }

    fn u32(&mut self) -> Result<usize, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, n: usize) -> Result<Value, String> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "a string is not UTF-8".to_string())?;
        Ok(Value::Str(s.to_string()))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("a GLOBAL name has no end of line")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        if v.depth() > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, String> {
        match self.stack.pop() {
            Some(Value::Mark) | None => Err("the stack is empty".into()),
            Some(v) => Ok(v),
        }
    }

    fn top(&mut self) -> Result<&mut Value, String> {
        self.stack
            .last_mut()
            .ok_or_else(|| "the stack is empty".into())
    }

    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: usize) -> Result<(), String> {
        let v = self.stack.last().ok_or("the stack is empty")?.clone();
        self.copies += v.nodes();
        if self.copies > MAX_MEMO_COPIES {
            return Err("too many memo copies".into());
        }
        self.memo.insert(key as u32, v);
        Ok(())
    }

    fn memo_get(&mut self, key: usize) -> Result<(), String> {
        let v = self
            .memo
            .get(&(key as u32))
            .ok_or_else(|| format!("memo slot {key} is empty"))?
            .clone();
        self.copies += v.nodes();
        if self.copies > MAX_MEMO_COPIES {
            return Err("too many memo copies".into());
        }
        self.push(v)
    }

    fn step(&mut self, op: u8) -> Result<(), String> {
        match op {
            0x80 => {
                let p = self.u8()?;
                if p > 5 {
                    return Err(format!("pickle protocol {p} is unknown"));
                }
            }
            0x95 => {
                self.u64()?; // FRAME: a length hint
            }
            b'(' => self.stack.push(Value::Mark),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if self.stack.len() < n || self.stack[self.stack.len() - n..].contains(&Value::Mark)
                {
                    return Err("the stack is too short for a tuple".into());
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::Tuple(items))?;
            }
            b'q' | b'r' | 0x94 | b'h' | b'j' => self.memo_op(op)?,
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            b'a' => {
                let v = self.pop()?;
                self.append(vec![v])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.append(items)?;
            }
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::Global(global(module, name)?))?;
            }
            0x93 => {
                let (Value::Str(name), Value::Str(module)) = (self.pop()?, self.pop()?) else {
                    return Err("STACK_GLOBAL needs two strings".into());
                };
                self.push(Value::Global(global(&module, &name)?))?;
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let v = reduce(f, args)?;
                self.push(v)?;
            }
            b'b' => {
                // BUILD: the state (an OrderedDict's `_metadata`, say) is not needed.
                self.pop()?;
                self.top()?;
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = persistent(pid)?;
                self.push(v)?;
            }
            _ => match self.literal(op)? {
                Some(v) => self.push(v)?,
                None => return Err(format!("opcode 0x{op:02x} is not one a state dict uses")),
            },
        }
        Ok(())
    }

    /// BINPUT, LONG_BINPUT, MEMOIZE, BINGET, LONG_BINGET.
    fn memo_op(&mut self, op: u8) -> Result<(), String> {
        match op {
            b'q' => {
                let k = self.u8()?;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.u32()?;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = self.memo.len();
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.u8()?;
                self.memo_get(k)?;
            }
            b'j' => {
                let k = self.u32()?;
                self.memo_get(k)?;
            }
            _ => return Err(format!("opcode 0x{op:02x} is not a memo opcode")),
        }
        Ok(())
    }

    /// The value an opcode that pushes a constant (or an empty container) pushes, or `None`
    /// for another opcode.
    fn literal(&mut self, op: u8) -> Result<Option<Value>, String> {
        Ok(Some(match op {
            b'}' => Value::Dict(Vec::new()),
            b']' => Value::List(Vec::new()),
            b')' => Value::Tuple(Vec::new()),
            b'X' => {
                let n = self.u32()?;
                self.string(n)?
            }
            0x8c => {
                let n = self.u8()?;
                self.string(n)?
            }
            0x8d => {
                let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                self.string(n)?
            }
            b'J' => {
                let b = self.take(4)?;
                Value::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into())
            }
            b'K' => Value::Int(self.u8()? as i64),
            b'M' => {
                let b = self.take(2)?;
                Value::Int(u16::from_le_bytes([b[0], b[1]]).into())
            }
            0x8a => self.long1()?,
            b'G' => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Value::Float(f64::from_be_bytes(a))
            }
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'N' => Value::None,
            _ => return Ok(None),
        }))
    }

    fn long1(&mut self) -> Result<Value, String> {
        let n = self.u8()?;
        let b = self.take(n)?;
        if n > 8 {
            return Err(format!("a {n}-byte integer is too large"));
        }
        let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
            [0xffu8; 8]
        } else {
            [0u8; 8]
        };
        a[..n].copy_from_slice(b);
        Ok(Value::Int(i64::from_le_bytes(a)))
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<(), String> {
        if items.len() & 1 == 1 {
            return Err("SETITEMS has an odd number of items".into());
        }
        let mut pairs = Vec::with_capacity(items.len() / 2);
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            pairs.push((k, v));
        }
        let depth = pairs.iter().map(|(k, v)| k.depth().max(v.depth())).max();
        if depth.unwrap_or(0) + 1 > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        match self.top()? {
            Value::Dict(d) => d.extend(pairs),
            other => return Err(format!("SETITEM on a {}, not a dict", other.kind())),
        }
        Ok(())
    }

    fn append(&mut self, items: Vec<Value>) -> Result<(), String> {
        if items.iter().map(Value::depth).max().unwrap_or(0) + 1 > MAX_DEPTH {
            return Err(format!("values nest deeper than {MAX_DEPTH} levels"));
        }
        match self.top()? {
            Value::List(l) => l.extend(items),
            other => return Err(format!("APPEND on a {}, not a list", other.kind())),
        }
        Ok(())
    }
}

/// `('storage', StorageType, key, location, numel)` -> a storage.
fn persistent(pid: Value) -> Result<Value, String> {
    let bad = || "a persistent id is not ('storage', type, key, location, numel)".to_string();
    let Value::Tuple(t) = pid else {
        return Err(bad());
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_), Value::Int(numel)]
            if tag == "storage" && *numel >= 0 =>
        {
            Ok(Value::Storage {
                dtype: *dtype,
                key: key.clone(),
                numel: *numel as u64,
            })
        }
        _ => Err(bad()),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    let Value::Tuple(t) = v else {
        return Err(format!("_rebuild_tensor_v2: {what} is not a tuple"));
    };
    t.iter()
        .map(|x| match x {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            _ => Err(format!(
                "_rebuild_tensor_v2: {what} holds a non-integer or a negative"
            )),
        })
        .collect()
}

/// Applies an allowed global to its arguments, building a plain value.
fn reduce(f: Value, args: Value) -> Result<Value, String> {
    let Value::Tuple(args) = args else {
        return Err("REDUCE arguments are not a tuple".into());
    };
    match f {
        Value::Global(Global::OrderedDict) if args.is_empty() => Ok(Value::Dict(Vec::new())),
        Value::Global(Global::RebuildParameter) => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err("_rebuild_parameter: the first argument is not a tensor".into()),
        },
        Value::Global(Global::RebuildTensorV2) if (6..=7).contains(&args.len()) => {
            let Value::Storage { dtype, key, numel } = &args[0] else {
                return Err("_rebuild_tensor_v2: the first argument is not a storage".into());
            };
            let Value::Int(offset) = args[1] else {
                return Err("_rebuild_tensor_v2: the storage offset is not an integer".into());
            };
            let offset = u64::try_from(offset).map_err(|_| "negative storage offset")?;
            let size = ints(&args[2], "size")?;
            let stride = ints(&args[3], "stride")?;
            if size.len() != stride.len() {
                return Err("_rebuild_tensor_v2: size and stride differ in length".into());
            }
            Ok(Value::Tensor(TensorRef {
                dtype: *dtype,
                key: key.clone(),
                numel: *numel,
                offset,
                size,
                stride,
            }))
        }
        other => Err(format!(
            "REDUCE of a {} with {} arguments is not part of a state dict",
            other.kind(),
            args.len()
        )),
    }
}
