//! How the keeper stores each lease's record text compactly, and gives back exactly the text it
//! was sent.
//!
//! Why: the keeper holds every lease of the host, and the record text (JSON, ~350 bytes) is most
//! of what a held lease costs it. Two parts of it repeat: the owners list (the same for all the
//! disks of one VM) and the locked path (the same as the lease's name in direct mode). The
//! record stays opaque text for the keeper (it must keep whatever any daemon version sent), so
//! nothing here parses JSON: the text is split and deduplicated by position, and every encoding
//! is checked to decode to the very same bytes before it is used; text that does not fit the
//! pattern is kept verbatim.

use std::collections::HashSet;
use std::sync::Arc;

/// Where the shared part of a record starts (this daemon's records end with the owners).
const TAIL_AT: &str = ",\"owners\":";
const NAME_KEY: &str = "\"name\":\"";
const LOCK_PATH_KEY: &str = "\"lock_path\":\"";
/// Above this many shared tails, forget those no held lease uses any more.
const PURGE_MIN: usize = 64;

/// One record, as the keeper keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptMeta {
    /// The record up to its shared tail, minus a repeated path when `dup` says so.
    head: Box<str>,
    /// The rest of the record, shared with every other record that ends the same way.
    tail: Option<Arc<str>>,
    /// The name's value is `head[name_start..name_end]` and was removed at `at` (all offsets in
    /// `head` as stored; `at` past the name).
    dup: Option<Dup>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dup {
    name_start: u16,
    name_end: u16,
    at: u16,
}

/// The shared tails in use.
#[derive(Debug, Default)]
pub struct Tails {
    set: HashSet<Arc<str>>,
    /// Size of the set after the last purge.
    kept: usize,
}

impl Tails {
    fn share(&mut self, tail: &str) -> Arc<str> {
        if let Some(t) = self.set.get(tail) {
            return Arc::clone(t);
        }
        if self.set.len() >= PURGE_MIN && self.set.len() >= 2 * self.kept {
            // Only this thread makes new references, so a count of 1 stays 1.
            self.set.retain(|t| Arc::strong_count(t) > 1);
            self.kept = self.set.len();
        }
        let t: Arc<str> = Arc::from(tail);
        self.set.insert(Arc::clone(&t));
        t
    }

    /// Shared tails known (in use or not yet purged).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.set.len()
    }
}

impl KeptMeta {
    /// Keep `text`; the result's [`KeptMeta::text`] is always exactly `text`.
    pub fn new(text: String, tails: &mut Tails) -> KeptMeta {
        let verbatim = |text: String| KeptMeta {
            head: text.into_boxed_str(),
            tail: None,
            dup: None,
        };
        let Some(split) = text.find(TAIL_AT) else {
            return verbatim(text);
        };
        let (head, tail) = text.split_at(split);
        let (head, dup) = dedup(head);
        let kept = KeptMeta {
            head: head.into_boxed_str(),
            tail: Some(tails.share(tail)),
            dup,
        };
        if kept.text() == text {
            kept
        } else {
            verbatim(text)
        }
    }

    /// The record text, as it was sent.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(
            self.head.len() + self.tail.as_ref().map_or(0, |t| t.len()) + self.name_len(),
        );
        match self.dup.and_then(|d| self.parts(d)) {
            Some((before, name, after)) => {
                out.push_str(before);
                out.push_str(name);
                out.push_str(after);
            }
            None => out.push_str(&self.head),
        }
        if let Some(t) = &self.tail {
            out.push_str(t);
        }
        out
    }

    fn name_len(&self) -> usize {
        self.dup
            .map_or(0, |d| usize::from(d.name_end) - usize::from(d.name_start))
    }

    fn parts(&self, d: Dup) -> Option<(&str, &str, &str)> {
        let name = self
            .head
            .get(usize::from(d.name_start)..usize::from(d.name_end))?;
        let (before, after) = self.head.split_at_checked(usize::from(d.at))?;
        Some((before, name, after))
    }
}

/// `head` without the lock path's value when it repeats the name's (and where to put it back).
fn dedup(head: &str) -> (String, Option<Dup>) {
    let found = (|| {
        let ns = head.find(NAME_KEY)? + NAME_KEY.len();
        let ne = ns + string_len(head.get(ns..)?)?;
        let name = head.get(ns..ne)?;
        let lp = head.find(LOCK_PATH_KEY)? + LOCK_PATH_KEY.len();
        let value = head.get(lp..)?;
        (value.len() > name.len()
            && value.starts_with(name)
            && value.as_bytes().get(name.len()) == Some(&b'"'))
        .then_some((ns, ne, lp))
    })();
    let Some((ns, ne, lp)) = found else {
        return (head.to_string(), None);
    };
    let len = ne - ns;
    // Offsets in the stored head: the name moves left when the lock path came first.
    let (name_start, name_end) = if lp < ns {
        (ns - len, ne - len)
    } else {
        (ns, ne)
    };
    let dup = (|| {
        Some(Dup {
            name_start: u16::try_from(name_start).ok()?,
            name_end: u16::try_from(name_end).ok()?,
            at: u16::try_from(lp).ok()?,
        })
    })();
    let Some(dup) = dup else {
        return (head.to_string(), None);
    };
    let mut out = String::with_capacity(head.len() - len);
    out.push_str(head.get(..lp).unwrap_or_default());
    out.push_str(head.get(lp + len..).unwrap_or_default());
    (out, Some(dup))
}

/// Length of the JSON string body at the start of `s` (up to its closing quote).
fn string_len(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, lock_path: &str, owner: &str) -> String {
        format!(
            "{{\"v\":1,\"name\":{},\"kind\":\"disk\",\"mode\":\"exclusive\",\"lock_path\":{},\
             \"since\":5,\"owners\":[{{\"owner\":{{\"uuid\":\"u\",\"name\":{},\"id\":1,\
             \"pid\":7}},\"since\":5,\"start\":9,\"action\":\"default\"}}]}}",
            serde_json::to_string(name).unwrap_or_default(),
            serde_json::to_string(lock_path).unwrap_or_default(),
            serde_json::to_string(owner).unwrap_or_default(),
        )
    }

    #[test]
    fn gives_back_the_same_text() {
        let mut tails = Tails::default();
        let texts = [
            record("/d/a.img", "/d/a.img", "vm"),
            record("/d/a.img", "/d/a.img.lock", "vm"),
            record("/d/a.img.lock", "/d/a.img", "vm"),
            record("key", "/ls/key", "vm"),
            record(
                "a \"quoted\\\" name\\",
                "a \"quoted\\\" name\\",
                "\"name\":\"",
            ),
            record("", "", ""),
            // Serialised from a serde_json::Value (keys sorted): lock_path before name.
            "{\"kind\":\"disk\",\"lock_path\":\"/x\",\"mode\":\"shared\",\"name\":\"/x\",\
             \"owners\":[],\"since\":1,\"v\":1}"
                .to_string(),
            "not json at all,\"owners\": \"name\":\"".to_string(),
            "\"name\":\"x\",\"lock_path\":\"x".to_string(),
            String::new(),
            "é\"name\":\"ü\",\"lock_path\":\"ü\",\"owners\":ö".to_string(),
        ];
        for t in texts {
            let k = KeptMeta::new(t.clone(), &mut tails);
            assert_eq!(k.text(), t);
        }
    }

    #[test]
    fn shares_tails_and_drops_the_repeated_path() {
        let mut tails = Tails::default();
        let a = KeptMeta::new(record("/d/a.img", "/d/a.img", "vm"), &mut tails);
        let b = KeptMeta::new(record("/d/b.img", "/d/b.img", "vm"), &mut tails);
        assert!(a.dup.is_some() && b.dup.is_some());
        assert!(!a.head.contains("\"lock_path\":\"/d/a.img\""));
        let (ta, tb) = (
            a.tail.clone().unwrap_or_default(),
            b.tail.unwrap_or_default(),
        );
        assert!(Arc::ptr_eq(&ta, &tb));
        assert_eq!(tails.len(), 1);
    }

    #[test]
    fn forgets_unused_tails() {
        let mut tails = Tails::default();
        let keep = KeptMeta::new(record("/k", "/k", "kept"), &mut tails);
        for i in 0..10 * PURGE_MIN {
            drop(KeptMeta::new(
                record("/d", "/d", &format!("vm{i}")),
                &mut tails,
            ));
        }
        assert!(tails.len() <= 2 * PURGE_MIN + 1, "{}", tails.len());
        let again = KeptMeta::new(record("/k2", "/k2", "kept"), &mut tails);
        assert_eq!(keep.tail, again.tail);
    }
}
