//! Parser for libvirt's configuration syntax, shared by the plugin config
//! (`qemu-lockwarden.conf`) and the daemon config (`lockwardend.conf`).
//!
//! The syntax: `key = value` per line, `#` comments, values are strings in double or single
//! quotes (or `"""` for multi-line), integers, or `[ ... ]` lists of values that may span lines.
//! Booleans are the integers 0 and 1. Every error names the file, the line and the key, because
//! an operator meets them as "libvirtd failed to start" and needs to know where to look.

use std::fmt;
use std::path::{Path, PathBuf};

/// A parsed value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
    List(Vec<Value>),
}

impl Value {
    fn describe(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::List(_) => "a list",
        }
    }
}

/// One `key = value` setting and where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub line: usize,
}

/// A configuration error: which file, which line, which key, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key '{key}': ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// A parsed file whose settings are taken one by one by typed getters; `finish` then rejects
/// whatever nobody took (unknown keys are errors, docs/interfaces.md §1).
#[derive(Debug)]
pub struct ConfFile {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl ConfFile {
    /// Read and parse `path`. A missing file is an empty configuration (all defaults).
    pub fn load(path: &Path) -> Result<ConfFile, ConfigError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ConfigError {
                    file: path.to_path_buf(),
                    line: None,
                    key: None,
                    message: "file is not valid UTF-8".into(),
                })?;
                ConfFile::parse(path, &text)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfFile {
                path: path.to_path_buf(),
                entries: Vec::new(),
            }),
            Err(e) => Err(ConfigError {
                file: path.to_path_buf(),
                line: None,
                key: None,
                message: format!("cannot read the file: {e}"),
            }),
        }
    }

    /// Parse `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<ConfFile, ConfigError> {
        let entries = Parser::new(path, text).entries()?;
        for (i, e) in entries.iter().enumerate() {
            if let Some(first) = entries.iter().take(i).find(|p| p.key == e.key) {
                return Err(ConfigError {
                    file: path.to_path_buf(),
                    line: Some(e.line),
                    key: Some(e.key.clone()),
                    message: format!("set twice (first on line {}); keep one", first.line),
                });
            }
        }
        Ok(ConfFile {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The file this configuration came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, key: &str) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.key == key)?;
        Some(self.entries.remove(pos))
    }

    fn error(&self, e: &Entry, message: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: Some(e.line),
            key: Some(e.key.clone()),
            message,
        }
    }

    /// Take a boolean (0 or 1).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ConfigError> {
        let Some(e) = self.take(key) else {
            return Ok(None);
        };
        match e.value {
            Value::Int(0) => Ok(Some(false)),
            Value::Int(1) => Ok(Some(true)),
            ref v => Err(self.error(&e, format!("expected 0 or 1, found {}", describe(v)))),
        }
    }

    /// Take a string.
    pub fn take_string(&mut self, key: &str) -> Result<Option<String>, ConfigError> {
        let Some(e) = self.take(key) else {
            return Ok(None);
        };
        match e.value {
            Value::Str(ref s) => Ok(Some(s.clone())),
            ref v => Err(self.error(
                &e,
                format!("expected a quoted string, found {}", describe(v)),
            )),
        }
    }

    /// Take an absolute path (a non-empty string starting with `/`).
    pub fn take_abs_path(&mut self, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        let line = self.entries.iter().find(|e| e.key == key).map(|e| e.line);
        match self.take_string(key)? {
            None => Ok(None),
            Some(s) if s.starts_with('/') => Ok(Some(PathBuf::from(s))),
            Some(s) => Err(ConfigError {
                file: self.path.clone(),
                line,
                key: Some(key.into()),
                message: format!("expected an absolute path, found \"{s}\""),
            }),
        }
    }

    /// Take an integer within `min..=max`.
    pub fn take_int(&mut self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ConfigError> {
        let Some(e) = self.take(key) else {
            return Ok(None);
        };
        match e.value {
            Value::Int(n) if (min..=max).contains(&n) => Ok(Some(n)),
            Value::Int(n) => Err(self.error(&e, format!("{n} is out of range {min}..={max}"))),
            ref v => Err(self.error(&e, format!("expected an integer, found {}", describe(v)))),
        }
    }

    /// Take a string that must be one of `choices`.
    pub fn take_choice(
        &mut self,
        key: &str,
        choices: &[&str],
    ) -> Result<Option<String>, ConfigError> {
        let line = self.entries.iter().find(|e| e.key == key).map(|e| e.line);
        match self.take_string(key)? {
            None => Ok(None),
            Some(s) if choices.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(ConfigError {
                file: self.path.clone(),
                line,
                key: Some(key.into()),
                message: format!("\"{s}\" is not one of {}", quote_list(choices)),
            }),
        }
    }

    /// Reject any setting nobody took: an unknown key is a typo the operator must hear about.
    pub fn finish(self) -> Result<(), ConfigError> {
        match self.entries.first() {
            None => Ok(()),
            Some(e) => Err(ConfigError {
                file: self.path.clone(),
                line: Some(e.line),
                key: Some(e.key.clone()),
                message: "unknown key; remove it or check its spelling".into(),
            }),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Str(s) => format!("the string \"{s}\""),
        Value::Int(n) => format!("the integer {n}"),
        other => other.describe().to_string(),
    }
}

fn quote_list(choices: &[&str]) -> String {
    let quoted: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
    quoted.join(", ")
}

/// A small hand-written recursive-descent parser over chars.
struct Parser<'a> {
    path: &'a Path,
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl<'a> Parser<'a> {
    fn new(path: &'a Path, text: &str) -> Self {
        Parser {
            path,
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
        }
    }

    fn err(&self, key: Option<&str>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: Some(self.line),
            key: key.map(str::to_string),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, off: usize) -> Option<char> {
        self.chars.get(self.pos + off).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    /// Skip blanks and comments; with `newlines`, also line ends.
    fn skip(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' | '\r' => {
                    self.bump();
                }
                '\n' if newlines => {
                    self.bump();
                }
                '#' => {
                    while let Some(c) = self.peek() {
                        if c == '\n' {
                            break;
                        }
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    fn entries(mut self) -> Result<Vec<Entry>, ConfigError> {
        let mut out = Vec::new();
        loop {
            self.skip(true);
            let Some(c) = self.peek() else {
                return Ok(out);
            };
            if !(c.is_ascii_alphabetic() || c == '_') {
                return Err(self.err(
                    None,
                    format!("expected a key name, found '{}'", c.escape_default()),
                ));
            }
            let line = self.line;
            let key = self.key();
            self.skip(false);
            if self.bump() != Some('=') {
                return Err(self.err(Some(&key), "expected '=' after the key"));
            }
            self.skip(false);
            let value = self.value(&key)?;
            self.skip(false);
            match self.peek() {
                None | Some('\n') => {}
                Some(';') => {
                    self.bump();
                }
                Some(c) => {
                    return Err(self.err(
                        Some(&key),
                        format!("unexpected '{}' after the value", c.escape_default()),
                    ));
                }
            }
            out.push(Entry { key, value, line });
        }
    }

    fn key(&mut self) -> String {
        let mut key = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                key.push(c);
                self.bump();
            } else {
                break;
            }
        }
        key
    }

    fn value(&mut self, key: &str) -> Result<Value, ConfigError> {
        match self.peek() {
            Some('"') if self.peek_at(1) == Some('"') && self.peek_at(2) == Some('"') => {
                self.pos += 3;
                self.string_until(key, "\"\"\"")
            }
            Some(q @ ('"' | '\'')) => {
                self.bump();
                self.string_until(key, if q == '"' { "\"" } else { "'" })
            }
            Some('[') => {
                self.bump();
                self.list(key)
            }
            Some(c) if c == '-' || c == '+' || c.is_ascii_digit() => self.int(key),
            Some(c) => Err(self.err(
                Some(key),
                format!(
                    "expected a value (string, integer or list), found '{}'",
                    c.escape_default()
                ),
            )),
            None => Err(self.err(Some(key), "expected a value, found the end of the file")),
        }
    }

    fn string_until(&mut self, key: &str, end: &str) -> Result<Value, ConfigError> {
        let start_line = self.line;
        let end: Vec<char> = end.chars().collect();
        let mut s = String::new();
        loop {
            if self.chars.get(self.pos..self.pos + end.len()) == Some(&end[..]) {
                self.pos += end.len();
                return Ok(Value::Str(s));
            }
            match self.bump() {
                Some('\n') if end.len() == 1 => {
                    return Err(ConfigError {
                        file: self.path.to_path_buf(),
                        line: Some(start_line),
                        key: Some(key.into()),
                        message: "string not closed on the same line".into(),
                    });
                }
                Some(c) => s.push(c),
                None => {
                    return Err(ConfigError {
                        file: self.path.to_path_buf(),
                        line: Some(start_line),
                        key: Some(key.into()),
                        message: "string not closed before the end of the file".into(),
                    });
                }
            }
        }
    }

    fn int(&mut self, key: &str) -> Result<Value, ConfigError> {
        let mut text = String::new();
        if let Some(c @ ('-' | '+')) = self.peek() {
            text.push(c);
            self.bump();
        }
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() {
                text.push(c);
                self.bump();
            } else {
                break;
            }
        }
        text.parse::<i64>()
            .map(Value::Int)
            .map_err(|_| self.err(Some(key), format!("\"{text}\" is not an integer")))
    }

    fn list(&mut self, key: &str) -> Result<Value, ConfigError> {
        let mut items = Vec::new();
        loop {
            self.skip(true);
            match self.peek() {
                Some(']') => {
                    self.bump();
                    return Ok(Value::List(items));
                }
                None => return Err(self.err(Some(key), "list not closed with ']'")),
                _ => {}
            }
            items.push(self.value(key)?);
            self.skip(true);
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.err(Some(key), "expected ',' or ']' in the list")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ConfFile, ConfigError> {
        ConfFile::parse(Path::new("/etc/libvirt/test.conf"), text)
    }

    #[test]
    fn parses_all_value_kinds() {
        let mut c = parse(
            "# comment\nauto_disk_leases = 0\nfile_lockspace_dir = \"/var/lib/x\" # trailing\n\
             list = [ \"a\",\n  'b', # inside\n 3 ]\nneg = -5\nmulti = \"\"\"x\ny\"\"\"\n",
        )
        .unwrap();
        assert_eq!(c.take_bool("auto_disk_leases").unwrap(), Some(false));
        assert_eq!(
            c.take_string("file_lockspace_dir").unwrap().as_deref(),
            Some("/var/lib/x")
        );
        assert_eq!(c.take_int("neg", -10, 10).unwrap(), Some(-5));
        assert_eq!(c.take_string("multi").unwrap().as_deref(), Some("x\ny"));
        let e = c.take("list").unwrap();
        assert_eq!(
            e.value,
            Value::List(vec![
                Value::Str("a".into()),
                Value::Str("b".into()),
                Value::Int(3)
            ])
        );
        c.finish().unwrap();
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let c = parse("auto_disk_leases = 1\nfile_lockspace_dri = \"/x\"\n").unwrap();
        let mut c = c;
        c.take_bool("auto_disk_leases").unwrap();
        let e = c.finish().unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(e.key.as_deref(), Some("file_lockspace_dri"));
        assert!(
            e.to_string()
                .starts_with("/etc/libvirt/test.conf:2: key 'file_lockspace_dri'")
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let mut c = parse("auto_disk_leases = 2\n").unwrap();
        assert!(
            c.take_bool("auto_disk_leases")
                .unwrap_err()
                .to_string()
                .contains("expected 0 or 1")
        );
        let mut c = parse("request_timeout_ms = \"fast\"\n").unwrap();
        assert!(c.take_int("request_timeout_ms", 1, 10).is_err());
        let mut c = parse("readonly_disks = \"maybe\"\n").unwrap();
        assert!(
            c.take_choice("readonly_disks", &["shared", "ignore"])
                .is_err()
        );
        let mut c = parse("file_lockspace_dir = \"relative\"\n").unwrap();
        assert!(c.take_abs_path("file_lockspace_dir").is_err());
    }

    #[test]
    fn syntax_errors_name_the_line() {
        for (text, line) in [
            ("a = \"unterminated\nb = 1\n", 1),
            ("a = 1\nb 1\n", 2),
            ("a = 1\n\nb = [1, 2\n", 4),
            ("a = 1 2\n", 1),
            ("= 1\n", 1),
            ("a = 12x\n", 1),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
        }
    }

    #[test]
    fn duplicate_key_is_an_error() {
        let e = parse("a = 1\na = 2\n").unwrap_err();
        assert!(e.to_string().contains("set twice"));
    }

    #[test]
    fn missing_file_is_defaults() {
        let c = ConfFile::load(Path::new("/nonexistent/lockwarden-test.conf")).unwrap();
        c.finish().unwrap();
    }
}
