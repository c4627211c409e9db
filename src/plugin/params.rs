//! `virLockManagerParam` arrays, decoded by `ffi` into owned values, and the `drvNew` object
//! parameters turned into an [`Owner`].
//!
//! libvirt passes exactly `uuid` (UUID), `name` (STRING), `id` (UINT), `pid` (UINT) and `uri`
//! (CSTRING, may be NULL) to `drvNew`. Unknown keys are ignored for forward compatibility (lockd
//! had to whitelist `uri` when it appeared); a known key with the wrong type is an error, and so
//! is a key given twice.

use super::error::PluginError;
use crate::protocol::Owner;

/// A decoded parameter value. Strings keep their exact bytes (`None` = a NULL pointer).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `VIR_LOCK_MANAGER_PARAM_TYPE_STRING`.
    Str(Option<Vec<u8>>),
    /// `VIR_LOCK_MANAGER_PARAM_TYPE_CSTRING`.
    CStr(Option<Vec<u8>>),
    Int(i32),
    Long(i64),
    UInt(u32),
    ULong(u64),
    Double(f64),
    Uuid([u8; 16]),
    /// A type tag this plugin does not know; the union was not read.
    Unknown(i32),
}

impl Value {
    /// The type name as libvirt spells it, for messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::Str(_) => "STRING".into(),
            Value::CStr(_) => "CSTRING".into(),
            Value::Int(_) => "INT".into(),
            Value::Long(_) => "LONG".into(),
            Value::UInt(_) => "UINT".into(),
            Value::ULong(_) => "ULONG".into(),
            Value::Double(_) => "DOUBLE".into(),
            Value::Uuid(_) => "UUID".into(),
            Value::Unknown(t) => format!("unknown type {t}"),
        }
    }
}

/// One decoded parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    pub key: String,
    pub value: Value,
}

impl Param {
    pub fn new(key: &str, value: Value) -> Param {
        Param {
            key: key.into(),
            value,
        }
    }
}

/// Find `key` in `params`: `Ok(None)` when absent, an error when given more than once.
pub fn lookup<'a>(
    params: &'a [Param],
    key: &str,
    context: &str,
) -> Result<Option<&'a Value>, PluginError> {
    let mut found = params.iter().filter(|p| p.key == key);
    let first = found.next();
    if found.next().is_some() {
        return Err(PluginError::invalid(format!(
            "{context}: parameter '{key}' is given more than once"
        )));
    }
    Ok(first.map(|p| &p.value))
}

/// The error for a known key of the wrong type.
pub fn wrong_type(context: &str, key: &str, value: &Value, expected: &str) -> PluginError {
    PluginError::invalid(format!(
        "{context}: parameter '{key}' has type {}, expected {expected}",
        value.type_name()
    ))
}

/// Format 16 raw bytes as a canonical lower-case UUID.
pub fn uuid_text(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

pub use crate::text::show;

fn small_unsigned(context: &str, key: &str, v: &Value) -> Result<u32, PluginError> {
    match v {
        Value::UInt(n) => Ok(*n),
        Value::Int(n) => u32::try_from(*n).map_err(|_| {
            PluginError::invalid(format!(
                "{context}: parameter '{key}' is {n}; it must not be negative"
            ))
        }),
        other => Err(wrong_type(context, key, other, "UINT or INT")),
    }
}

/// Build the owner from `drvNew`'s parameters.
pub fn owner_from_params(params: &[Param]) -> Result<Owner, PluginError> {
    // The name first, so every later message can name the VM.
    let name = match lookup(params, "name", "drvNew")? {
        None => {
            return Err(PluginError::invalid(
                "drvNew: the domain parameter 'name' is missing; libvirt always passes it, so \
                 the caller is not a compatible libvirt",
            ));
        }
        Some(Value::Str(Some(b)) | Value::CStr(Some(b))) => match std::str::from_utf8(b) {
            Ok("") => {
                return Err(PluginError::invalid(
                    "drvNew: the domain parameter 'name' is empty",
                ));
            }
            Ok(s) => s.to_string(),
            Err(_) => {
                return Err(PluginError::invalid(format!(
                    "drvNew: the domain name {} is not valid UTF-8",
                    show(b)
                )));
            }
        },
        Some(Value::Str(None) | Value::CStr(None)) => {
            return Err(PluginError::invalid(
                "drvNew: the domain parameter 'name' is a NULL string",
            ));
        }
        Some(other) => return Err(wrong_type("drvNew", "name", other, "STRING")),
    };
    let ctx = format!("drvNew for VM {}", show(name.as_bytes()));

    let uuid = match lookup(params, "uuid", &ctx)? {
        None => {
            return Err(PluginError::invalid(format!(
                "{ctx}: the domain parameter 'uuid' is missing; libvirt always passes it, so the \
                 caller is not a compatible libvirt"
            )));
        }
        Some(Value::Uuid(b)) => {
            if b.iter().all(|x| Some(x) == b.first()) {
                return Err(PluginError::invalid(format!(
                    "{ctx}: the domain UUID {} is not valid (all bytes are equal)",
                    uuid_text(b)
                )));
            }
            uuid_text(b)
        }
        Some(other) => return Err(wrong_type(&ctx, "uuid", other, "UUID")),
    };

    let id = match lookup(params, "id", &ctx)? {
        None => 0,
        Some(v) => small_unsigned(&ctx, "id", v)?,
    };
    let pid = match lookup(params, "pid", &ctx)? {
        None => 0,
        Some(v) => small_unsigned(&ctx, "pid", v)?,
    };
    match lookup(params, "uri", &ctx)? {
        None | Some(Value::Str(_) | Value::CStr(_)) => {}
        Some(other) => return Err(wrong_type(&ctx, "uri", other, "CSTRING")),
    }
    Ok(Owner {
        uuid,
        name,
        id,
        pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [
        0xc7, 0xa5, 0xfd, 0xbd, 0xcd, 0xaf, 0x94, 0x55, 0x92, 0x6a, 0xd6, 0x5c, 0x16, 0xdb, 0x18,
        0x09,
    ];

    fn libvirt_params() -> Vec<Param> {
        vec![
            Param::new("uuid", Value::Uuid(UUID)),
            Param::new("name", Value::Str(Some(b"web1".to_vec()))),
            Param::new("id", Value::UInt(3)),
            Param::new("pid", Value::UInt(4242)),
            Param::new("uri", Value::CStr(Some(b"qemu:///system".to_vec()))),
        ]
    }

    #[test]
    fn libvirt_params_make_an_owner() {
        let o = owner_from_params(&libvirt_params()).unwrap();
        assert_eq!(o.uuid, "c7a5fdbd-cdaf-9455-926a-d65c16db1809");
        assert_eq!(o.name, "web1");
        assert_eq!(o.id, 3);
        assert_eq!(o.pid, 4242);
    }

    #[test]
    fn unknown_keys_ignored_null_uri_fine() {
        let mut p = libvirt_params();
        p[4] = Param::new("uri", Value::CStr(None));
        p.push(Param::new("future", Value::Unknown(99)));
        p.push(Param::new("other", Value::Double(1.5)));
        assert!(owner_from_params(&p).is_ok());
    }

    #[test]
    fn bad_params_are_errors() {
        type Edit = Box<dyn Fn(&mut Vec<Param>)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|p| drop(p.remove(0))), "'uuid' is missing"),
            (Box::new(|p| drop(p.remove(1))), "'name' is missing"),
            (
                Box::new(|p| p[0] = Param::new("uuid", Value::Uuid([7; 16]))),
                "all bytes are equal",
            ),
            (
                Box::new(|p| p[0] = Param::new("uuid", Value::Str(Some(b"x".to_vec())))),
                "'uuid' has type STRING, expected UUID",
            ),
            (
                Box::new(|p| p[1] = Param::new("name", Value::Str(None))),
                "NULL string",
            ),
            (
                Box::new(|p| p[1] = Param::new("name", Value::UInt(1))),
                "'name' has type UINT",
            ),
            (
                Box::new(|p| p[2] = Param::new("id", Value::Str(None))),
                "'id' has type STRING",
            ),
            (
                Box::new(|p| p[3] = Param::new("pid", Value::Int(-1))),
                "must not be negative",
            ),
            (
                Box::new(|p| p[3] = Param::new("pid", Value::Unknown(42))),
                "unknown type 42",
            ),
            (
                Box::new(|p| p[4] = Param::new("uri", Value::UInt(1))),
                "'uri' has type UINT",
            ),
            (
                Box::new(|p| p.push(Param::new("name", Value::Str(Some(b"x".to_vec()))))),
                "more than once",
            ),
        ];
        for (edit, want) in cases {
            let mut p = libvirt_params();
            edit(&mut p);
            let e = owner_from_params(&p).unwrap_err();
            assert!(e.message.contains(want), "{} vs {want}", e.message);
        }
    }

    #[test]
    fn show_escapes_and_shortens() {
        assert_eq!(show(b"/a b\nc"), "'/a b\\nc'");
        assert_eq!(show(b"/\xff"), "'/\\xff'");
        let long = vec![b'a'; 5000];
        assert!(show(&long).ends_with("...' (5000 bytes)"));
    }
}
