//! Aligned text tables and UTC timestamps for the CLI's human output.

use crate::protocol::LeaseInfo;

/// Render rows under an optional header, columns padded to the widest cell.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    // Cells can carry text from shared storage (host names, VM names other hosts wrote):
    // escape them all here, once, so no terminal escape sequence reaches the operator.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| crate::untrusted::escape(c)).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            match widths.get_mut(i) {
                Some(w) => *w = (*w).max(cell.chars().count()),
                None => widths.push(cell.chars().count()),
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut parts = Vec::new();
        for (i, cell) in cells.enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            parts.push(format!("{cell:<w$}"));
        }
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    if !header.is_empty() {
        line(&mut header.iter().copied());
    }
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// One table row per owner of a lease.
pub fn lease_rows(lease: &LeaseInfo) -> Vec<Vec<String>> {
    let mode = crate::text::mode_word(lease.mode);
    let disk = lease.name.escape_debug().to_string();
    if lease.owners.is_empty() {
        return vec![vec![
            disk,
            mode.into(),
            "-".into(),
            "-".into(),
            "-".into(),
            utc(lease.since),
        ]];
    }
    lease
        .owners
        .iter()
        .map(|o| {
            vec![
                disk.clone(),
                mode.into(),
                o.name.escape_debug().to_string(),
                o.uuid.clone(),
                o.pid.to_string(),
                utc(lease.since),
            ]
        })
        .collect()
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC` (the daemon's formatter, so the CLI
/// and the refusal messages print times identically).
pub use crate::text::utc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(&["A", "LONGER"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONGER\nxyz  1\n");
    }
}
