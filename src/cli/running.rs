//! The QEMU domains running on this host, read from libvirt's own status files.
//!
//! Why the status files (`/run/libvirt/qemu/<name>.xml`) and not libvirt's API: they hold what
//! the lock manager needs and `virsh dumpxml` does not show — the QEMU pid — and reading them
//! adds no dependency to the plugin or the CLI. They are written by libvirtd (root, mode 0600)
//! while a domain runs and removed when it stops. They are still read defensively: regular
//! files only (no device open, no symbolic link), at most [`MAX_STATUS`] bytes, parsed by the
//! small bounded XML reader below (depth and element count capped), and every value taken from
//! them is escaped before it is printed.
//!
//! What is taken, exactly as libvirt hands it to the plugin (docs/migration.md):
//! `<domstatus state= pid=>`, `<domain id=>`, `<name>`, `<uuid>`, `<on_lockfailure>`, every
//! `<lease>` (key, lockspace, target path and offset) and every `<disk>` of type file, block or
//! dir with a source path — the top image only, never its `<backingStore>` or `<mirror>` —
//! with its `<readonly/>` and `<shareable/>` flags.

use crate::protocol::{FailureAction, Owner};
use crate::untrusted::{self, Access};
use nix::errno::Errno;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// libvirt's status directory for the system QEMU driver.
pub const STATUS_DIR: &str = "/run/libvirt/qemu";
/// Largest status file read (libvirt's are tens of KiB; the QEMU capability list dominates).
pub const MAX_STATUS: usize = 8 << 20;
/// Deepest element nesting accepted.
const MAX_DEPTH: usize = 64;
/// Most elements accepted in one file.
const MAX_ELEMENTS: usize = 200_000;
/// Most status files read.
const MAX_DOMAINS: usize = 4096;

/// One element of the parsed XML.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

impl Element {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }
    fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|c| c.text.trim().to_string())
    }
}

/// Parse an XML document into its root element. Enough XML for libvirt's files: elements,
/// attributes in either quote, the five named entities and numeric character references,
/// comments, processing instructions, CDATA; no DTDs.
pub fn parse_xml(text: &str) -> Result<Element, String> {
    let mut p = Parser {
        s: text.as_bytes(),
        text,
        i: 0,
        elements: 0,
    };
    p.misc()?;
    let root = p.element(0)?;
    p.misc()?;
    if p.i < p.s.len() {
        return Err(format!("content after the root element at byte {}", p.i));
    }
    Ok(root)
}

struct Parser<'a> {
    s: &'a [u8],
    text: &'a str,
    i: usize,
    elements: usize,
}

impl Parser<'_> {
    fn peek(&self, prefix: &str) -> bool {
        self.s
            .get(self.i..)
            .is_some_and(|r| r.starts_with(prefix.as_bytes()))
    }
    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| b.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    /// Skip up to and including `end`.
    fn skip_past(&mut self, end: &str) -> Result<(), String> {
        let rest = self.text.get(self.i..).unwrap_or_default();
        match rest.find(end) {
            Some(n) => {
                self.i += n + end.len();
                Ok(())
            }
            None => Err(format!(
                "unterminated construct at byte {} (no {end:?})",
                self.i
            )),
        }
    }
    /// Whitespace, comments and processing instructions between elements.
    fn misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            if self.peek("<!--") {
                self.skip_past("-->")?;
            } else if self.peek("<?") {
                self.skip_past("?>")?;
            } else if self.peek("<!DOCTYPE") {
                return Err("a DOCTYPE is not accepted in a libvirt status file".into());
            } else {
                return Ok(());
            }
        }
    }
    fn name(&mut self) -> Result<String, String> {
        let start = self.i;
        while self.s.get(self.i).is_some_and(|&b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':') || b >= 0x80
        }) {
            self.i += 1;
        }
        if self.i == start {
            return Err(format!("a name was expected at byte {start}"));
        }
        Ok(self.text.get(start..self.i).unwrap_or_default().to_string())
    }
    fn element(&mut self, depth: usize) -> Result<Element, String> {
        if depth >= MAX_DEPTH {
            return Err(format!("elements nested deeper than {MAX_DEPTH}"));
        }
        self.elements += 1;
        if self.elements > MAX_ELEMENTS {
            return Err(format!("more than {MAX_ELEMENTS} elements"));
        }
        if !self.peek("<") {
            return Err(format!("'<' expected at byte {}", self.i));
        }
        self.i += 1;
        let mut el = Element {
            name: self.name()?,
            ..Element::default()
        };
        loop {
            self.skip_ws();
            if self.peek("/>") {
                self.i += 2;
                return Ok(el);
            }
            if self.peek(">") {
                self.i += 1;
                break;
            }
            let key = self.name()?;
            self.skip_ws();
            if !self.peek("=") {
                return Err(format!("'=' expected after attribute {key:?}"));
            }
            self.i += 1;
            self.skip_ws();
            let quote = match self.s.get(self.i) {
                Some(&q @ (b'\'' | b'"')) => q as char,
                _ => return Err(format!("a quoted value expected for attribute {key:?}")),
            };
            self.i += 1;
            let rest = self.text.get(self.i..).unwrap_or_default();
            let n = rest
                .find(quote)
                .ok_or_else(|| format!("unterminated value of attribute {key:?}"))?;
            let raw = rest.get(..n).unwrap_or_default();
            self.i += n + 1;
            el.attrs.push((key, unescape(raw)?));
        }
        loop {
            let rest = self.text.get(self.i..).unwrap_or_default();
            let n = rest.find('<').ok_or_else(|| {
                format!(
                    "element <{}> is not closed before the end of the file",
                    el.name
                )
            })?;
            el.text
                .push_str(&unescape(rest.get(..n).unwrap_or_default())?);
            self.i += n;
            if self.peek("</") {
                self.i += 2;
                let end = self.name()?;
                if end != el.name {
                    return Err(format!("</{end}> closes <{}>", el.name));
                }
                self.skip_ws();
                if !self.peek(">") {
                    return Err(format!("'>' expected after </{end}"));
                }
                self.i += 1;
                return Ok(el);
            } else if self.peek("<!--") {
                self.skip_past("-->")?;
            } else if self.peek("<![CDATA[") {
                self.i += 9;
                let rest = self.text.get(self.i..).unwrap_or_default();
                let n = rest.find("]]>").ok_or("unterminated CDATA section")?;
                el.text.push_str(rest.get(..n).unwrap_or_default());
                self.i += n + 3;
            } else if self.peek("<?") {
                self.skip_past("?>")?;
            } else {
                let child = self.element(depth + 1)?;
                el.children.push(child);
            }
        }
    }
}

/// Replace XML entities and character references.
fn unescape(raw: &str) -> Result<String, String> {
    if !raw.contains('&') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(a) = rest.find('&') {
        out.push_str(rest.get(..a).unwrap_or_default());
        let after = rest.get(a + 1..).unwrap_or_default();
        let semi = after
            .find(';')
            .filter(|&n| n <= 10)
            .ok_or_else(|| format!("a bare '&' in {raw:?}"))?;
        let ent = after.get(..semi).unwrap_or_default();
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "apos" => '\'',
            "quot" => '"',
            _ => {
                let code = if let Some(hex) = ent.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()
                } else if let Some(dec) = ent.strip_prefix('#') {
                    dec.parse().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .ok_or_else(|| format!("unknown entity &{ent}; in {raw:?}"))?
            }
        };
        out.push(c);
        rest = after.get(semi + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    Ok(out)
}

/// A `<disk>` or `<lease>` as libvirt passes it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Disk {
        path: String,
        readonly: bool,
        shared: bool,
    },
    Lease {
        key: String,
        path: Option<String>,
        offset: Option<u64>,
        lockspace: Option<String>,
    },
    /// A disk libvirt locks but whose path is not in the status file (`type='volume'`).
    Unresolved { what: String },
}

/// One domain from a status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub status_file: PathBuf,
    /// `<domstatus state=...>`: running, paused, ...
    pub state: String,
    pub owner: Owner,
    pub action: FailureAction,
    pub resources: Vec<Resource>,
}

impl Domain {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

fn failure_action(text: Option<String>) -> Result<FailureAction, String> {
    Ok(match text.as_deref() {
        None | Some("") | Some("default") => FailureAction::Default,
        Some("poweroff") => FailureAction::Poweroff,
        Some("restart") => FailureAction::Restart,
        Some("pause") => FailureAction::Pause,
        Some("ignore") => FailureAction::Ignore,
        Some(other) => return Err(format!("unknown <on_lockfailure> value {other:?}")),
    })
}

/// Turn a parsed status document into a [`Domain`].
pub fn domain_from(status_file: &Path, root: &Element) -> Result<Domain, String> {
    if root.name != "domstatus" {
        return Err(format!(
            "the root element is <{}>, not <domstatus>",
            root.name
        ));
    }
    let state = root.attr("state").unwrap_or_default().to_string();
    let pid: u32 = root
        .attr("pid")
        .and_then(|p| p.parse().ok())
        .filter(|&p| p > 0 && i32::try_from(p).is_ok())
        .ok_or("<domstatus> has no valid pid attribute")?;
    let dom = root.child("domain").ok_or("no <domain> element")?;
    let id: u32 = dom.attr("id").and_then(|v| v.parse().ok()).unwrap_or(0);
    let name = dom.child_text("name").unwrap_or_default();
    let uuid = dom.child_text("uuid").unwrap_or_default();
    if name.is_empty() || uuid.is_empty() {
        return Err("the domain has no <name> or no <uuid>".into());
    }
    let action = failure_action(dom.child_text("on_lockfailure"))?;
    let mut resources = Vec::new();
    if let Some(devices) = dom.child("devices") {
        // libvirt adds every <lease> first, then every <disk>, in XML order.
        for l in devices.children_named("lease") {
            let target = l.child("target");
            resources.push(Resource::Lease {
                key: l.child_text("key").unwrap_or_default(),
                path: target.and_then(|t| t.attr("path")).map(str::to_string),
                offset: target
                    .and_then(|t| t.attr("offset"))
                    .map(|o| {
                        o.parse()
                            .map_err(|_| format!("lease offset {o:?} is not a number"))
                    })
                    .transpose()?,
                lockspace: l.child_text("lockspace").filter(|s| !s.is_empty()),
            });
        }
        for d in devices.children_named("disk") {
            if let Some(r) = disk_resource(d) {
                resources.push(r);
            }
        }
    }
    Ok(Domain {
        status_file: status_file.to_path_buf(),
        state,
        owner: Owner {
            uuid,
            name,
            id,
            pid,
        },
        action,
        resources,
    })
}

/// What libvirt's `virDomainLockManagerAddImage` would pass for this `<disk>`: only local
/// storage (file, block, dir) with a path; network disks and empty drives are not locked.
fn disk_resource(d: &Element) -> Option<Resource> {
    let kind = d.attr("type").unwrap_or("file");
    let src = d.child("source");
    let attr = match kind {
        "file" => "file",
        "block" => "dev",
        "dir" => "dir",
        "volume" => {
            let src = src?;
            return Some(Resource::Unresolved {
                what: format!(
                    "volume {:?} of pool {:?}",
                    src.attr("volume").unwrap_or_default(),
                    src.attr("pool").unwrap_or_default()
                ),
            });
        }
        _ => return None,
    };
    let path = src?.attr(attr)?;
    if path.is_empty() {
        return None;
    }
    Some(Resource::Disk {
        path: path.to_string(),
        readonly: d.child("readonly").is_some(),
        shared: d.child("shareable").is_some(),
    })
}

/// Read one status file.
pub fn read_status(path: &Path) -> Result<Domain, String> {
    let shown = path.display();
    let (fd, _, _) = untrusted::open_regular_at(None, &path.to_string_lossy(), Access::Read, None)
        .map_err(|e| {
            format!(
                "cannot open libvirt's status file {shown}: {}",
                e.describe()
            )
        })?;
    let bytes = untrusted::read_bounded(fd.as_fd(), MAX_STATUS)
        .map_err(|e| format!("cannot read libvirt's status file {shown}: {}", e.desc()))?
        .ok_or_else(|| {
            format!("libvirt's status file {shown} is larger than {MAX_STATUS} bytes")
        })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("libvirt's status file {shown} is not UTF-8"))?;
    let root = parse_xml(text).map_err(|e| format!("libvirt's status file {shown}: {e}"))?;
    domain_from(path, &root).map_err(|e| format!("libvirt's status file {shown}: {e}"))
}

/// Every domain with a status file in `dir`, sorted by name; unreadable files are returned as
/// errors next to them (one bad file must not hide the others).
pub fn domains(dir: &Path) -> Result<(Vec<Domain>, Vec<String>), String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => {
            return Err(format!(
                "cannot list libvirt's status directory {}: {e}; run as root on the libvirt host",
                dir.display()
            ));
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "xml"))
        .collect();
    paths.sort();
    paths.truncate(MAX_DOMAINS);
    let mut doms = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match read_status(&p) {
            Ok(d) => doms.push(d),
            // Removed meanwhile: the domain stopped.
            Err(_) if !p.exists() => {}
            Err(e) => errors.push(e),
        }
    }
    doms.sort_by(|a, b| a.owner.name.cmp(&b.owner.name));
    Ok((doms, errors))
}

/// Is `pid` still this domain's QEMU? libvirt starts QEMU with `-name guest=NAME,...` (a comma
/// in the name doubled); a pid that exited or was reused by another program is not adopted.
pub fn is_qemu_of(pid: u32, name: &str) -> Result<(), String> {
    let cmdline = match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => c,
        Err(e) if e.raw_os_error() == Some(Errno::ENOENT as i32) => {
            return Err(format!("its QEMU (pid {pid}) is not running"));
        }
        Err(e) => return Err(format!("cannot read /proc/{pid}/cmdline: {e}")),
    };
    let want = format!("guest={}", name.replace(',', ",,"));
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(a) = args.next() {
        if a == b"-name" {
            if let Some(v) = args.next() {
                let v = String::from_utf8_lossy(v);
                if v == name || v == want || v.starts_with(&format!("{want},")) {
                    return Ok(());
                }
            }
        }
    }
    Err(format!(
        "pid {pid} is not the QEMU of this domain (its command line has no \"-name {want}\"); \
         the status file is stale"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = r#"<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST.
-->
<domstatus state='running' reason='booted' pid='4242'>
  <taint flag='high-privileges'/>
  <devices>
    <device alias='virtio-disk0'/>
  </devices>
  <domain type='qemu' id='7'>
    <name>web, &amp; one</name>
    <uuid>c7a5fdbd-cdaf-9455-926a-d65c16db1809</uuid>
    <on_lockfailure>pause</on_lockfailure>
    <devices>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/img/Bob&apos;s &quot;a&quot;.qcow2' index='2'/>
        <backingStore type='file' index='3'>
          <format type='qcow2'/>
          <source file='/img/base.qcow2'/>
        </backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type='block' device='disk'><source dev='/dev/vg/lv'/><shareable/></disk>
      <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>
      <disk type='file' device='cdrom'><source file='/iso/a.iso'/><readonly/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/img'/></disk>
      <lease><lockspace>ls</lockspace><key>k1</key><target path='/leases' offset='0'/></lease>
    </devices>
  </domain>
</domstatus>
"#;

    #[test]
    fn reads_a_status_file_like_libvirt_passes_it() {
        let root = parse_xml(STATUS).unwrap();
        let d = domain_from(Path::new("/x.xml"), &root).unwrap();
        assert_eq!(d.owner.pid, 4242);
        assert_eq!(d.owner.id, 7);
        assert_eq!(d.owner.name, "web, & one");
        assert_eq!(d.action, FailureAction::Pause);
        assert!(d.running());
        assert_eq!(
            d.resources,
            vec![
                Resource::Lease {
                    key: "k1".into(),
                    path: Some("/leases".into()),
                    offset: Some(0),
                    lockspace: Some("ls".into())
                },
                Resource::Disk {
                    path: "/img/Bob's \"a\".qcow2".into(),
                    readonly: false,
                    shared: false
                },
                Resource::Disk {
                    path: "/dev/vg/lv".into(),
                    readonly: false,
                    shared: true
                },
                Resource::Disk {
                    path: "/iso/a.iso".into(),
                    readonly: true,
                    shared: false
                },
            ]
        );
    }

    #[test]
    fn refuses_bad_xml() {
        for bad in [
            "<a><b></a>",
            "<a x=1/>",
            "<a>&bogus;</a>",
            "<a>",
            "<!DOCTYPE a><a/>",
            "<a/><b/>",
        ] {
            assert!(parse_xml(bad).is_err(), "{bad}");
        }
        let deep = "<a>".repeat(100) + &"</a>".repeat(100);
        assert!(parse_xml(&deep).unwrap_err().contains("deeper"));
        assert_eq!(parse_xml("<a>&#x41;&#66;</a>").unwrap().text, "AB");
    }

    #[test]
    fn qemu_check_names_the_pid() {
        let e = is_qemu_of(std::process::id(), "nosuchvm").unwrap_err();
        assert!(e.contains("not the QEMU"), "{e}");
    }
}
