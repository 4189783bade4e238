//! Writes held as data: a statement and what binds it, run now or later,
//! alone or folded with others into one statement.
//!
//! A service's state change and the delivery machinery's own rows (an outbox
//! message, an idempotency record) must commit together. Each is a round trip
//! when run as a statement of its own. On Postgres, writes that do not read
//! each other's rows can run as *one* statement: all but the last as
//! data-modifying `WITH` parts ahead of the last, all in one snapshot and all
//! or none. [`Write`] holds one such write until the caller knows what runs
//! with it; [`Write::fold`] builds the single statement; [`run_writes`] runs a
//! list the way the backend allows. SQLite has no writes in `WITH`, so there
//! [`Write::script`] joins them into one `;`-separated script: sqlx runs
//! each SQLite connection on a thread of its own, and hands it a whole
//! script in one message, where each statement alone would cost a wake-up
//! of that thread and one back.

use std::borrow::Cow;
use std::ops::Range;

use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, AnyConnection};

use super::Backend;

/// Binds a [`Write`]'s parameters onto a query, in order.
pub type BindWrite = Box<
    dyn for<'q> FnOnce(Query<'q, Any, AnyArguments<'q>>) -> Query<'q, Any, AnyArguments<'q>> + Send,
>;

/// One write statement with placeholders `$1..$params`, and what binds them
/// (owned values, so the write can wait to be run).
pub struct Write {
    /// The statement, e.g. `INSERT INTO orders (...) VALUES ($1, ...)`. It
    /// must be a plain `INSERT`, `UPDATE` or `DELETE` (no `WITH` of its own)
    /// for [`Write::fold`] to place it in a `WITH`.
    pub sql: Cow<'static, str>,
    /// How many placeholders it uses (`$1` to `$params`, each at least once).
    pub params: usize,
    /// Binds them, in order.
    pub bind: BindWrite,
    /// Byte ranges of `sql` that hold every placeholder and repeat once per
    /// write when writes of this text merge into one statement (see
    /// [`Write::merged`]). Empty: the write never merges.
    repeat: Vec<Range<usize>>,
}

impl std::fmt::Debug for Write {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write")
            .field("sql", &self.sql)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Write {
    /// A write from its statement, its placeholder count and its binder.
    pub fn new(
        sql: impl Into<Cow<'static, str>>,
        params: usize,
        bind: impl for<'q> FnOnce(Query<'q, Any, AnyArguments<'q>>) -> Query<'q, Any, AnyArguments<'q>>
            + Send
            + 'static,
    ) -> Self {
        let sql = sql.into();
        // A single-row `INSERT ... VALUES (...)` with every placeholder in
        // its tuple merges with its twins into a multi-row insert.
        let tuple = values_tuple(&sql).into_iter().collect();
        Self {
            sql,
            params,
            bind: Box::new(bind),
            repeat: Vec::new(),
        }
        .repeating(tuple)
    }

    /// This write with `sections` (byte ranges of its text, in order,
    /// apart) that repeat once per write, `, `-separated, when writes of
    /// the same text merge: for example the row of an
    /// `UPDATE ... FROM (VALUES (<row>))` and the id in its `id IN (<id>)`.
    /// Every placeholder must lie in a section; otherwise (or with a range
    /// out of bounds, or none) the write never merges.
    pub fn repeating(mut self, sections: Vec<Range<usize>>) -> Self {
        let ordered = sections.windows(2).all(|w| w[0].end <= w[1].start);
        let inside = sections
            .iter()
            .all(|r| r.start < r.end && self.sql.get(r.clone()).is_some());
        self.repeat = if !sections.is_empty()
            && ordered
            && inside
            && placeholders_only_in(&self.sql, &sections)
        {
            sections
        } else {
            Vec::new()
        };
        self
    }

    /// Whether this write merges with writes of the same text.
    pub fn merges(&self) -> bool {
        !self.repeat.is_empty()
    }

    /// `writes` with those of one mergeable text merged into one statement
    /// each ([`Write::repeating`]; single-row inserts become one multi-row
    /// insert), in the place of the first of them, or last if the last
    /// write is one of them. One statement per text instead of one per
    /// write: one parse and one plan however many rows, where a `WITH` part
    /// per row cost Postgres a plan and an executor node per row. Writes
    /// handed to [`Write::fold`] or [`Write::script`] do not read each
    /// other's rows, so their order among one another does not matter.
    pub fn merged(writes: Vec<Write>) -> Vec<Write> {
        if writes.len() < 2 || writes.iter().filter(|w| w.merges()).count() < 2 {
            return writes;
        }
        let last = writes.len() - 1;
        // Group index per write, groups in order of their first member.
        let mut groups: Vec<(usize, Vec<Write>)> = Vec::new();
        let mut holds_last: Option<usize> = None;
        for (i, w) in writes.into_iter().enumerate() {
            let at = if w.merges() {
                groups.iter().position(|(_, g)| {
                    g[0].merges() && g[0].sql == w.sql && g[0].repeat == w.repeat
                })
            } else {
                None
            };
            let at = match at {
                Some(at) => {
                    groups[at].1.push(w);
                    at
                }
                None => {
                    groups.push((i, vec![w]));
                    groups.len() - 1
                }
            };
            if i == last {
                holds_last = Some(at);
            }
        }
        if let Some(at) = holds_last {
            let g = groups.remove(at);
            groups.push(g);
        }
        groups
            .into_iter()
            .map(|(_, g)| Self::merge_group(g))
            .collect()
    }

    /// Writes of one mergeable text as one: each repeating section holds
    /// every write's copy in turn, its placeholders numbered after the
    /// previous writes', the binders chained in the same order.
    fn merge_group(mut writes: Vec<Write>) -> Write {
        if writes.len() == 1 {
            if let Some(w) = writes.pop() {
                return w;
            }
        }
        let sql = writes[0].sql.clone();
        let sections = writes[0].repeat.clone();
        let offsets: Vec<usize> = writes
            .iter()
            .scan(0, |acc, w| {
                let at = *acc;
                *acc += w.params;
                Some(at)
            })
            .collect();
        let mut out = String::with_capacity(sql.len() * writes.len());
        let mut from = 0;
        for r in &sections {
            out.push_str(&sql[from..r.start]);
            for (i, offset) in offsets.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&shift_placeholders(&sql[r.clone()], *offset));
            }
            from = r.end;
        }
        out.push_str(&sql[from..]);
        let params = writes.iter().map(|w| w.params).sum();
        let binds: Vec<BindWrite> = writes.into_iter().map(|w| w.bind).collect();
        // Merged once: no sections to repeat again.
        Write {
            sql: out.into(),
            params,
            bind: chained(binds),
            repeat: Vec::new(),
        }
    }

    /// Postgres: `writes` as one statement. Every write but the last becomes
    /// a data-modifying `WITH` part (`w0`, `w1`, ...) ahead of the last, each
    /// one's placeholders numbered after the previous ones', and the binders
    /// chained in the same order. The parts share one snapshot, so none sees
    /// another's rows; all run to completion, or the statement fails and
    /// none is kept. `None` for an empty list.
    pub fn fold(writes: Vec<Write>) -> Option<Write> {
        Self::joined(Self::merged(writes), |sql, i, n, part| {
            if i + 1 < n {
                sql.push_str(if i == 0 { "WITH " } else { ", " });
                sql.push_str(&format!("w{i} AS ({part})"));
            } else {
                if n > 1 {
                    sql.push(' ');
                }
                sql.push_str(part);
            }
        })
    }

    /// SQLite: `writes` as one script, the statements one after another
    /// (each ended by `;` and a line break, so a trailing `--` comment in
    /// one cannot swallow the next), each one's placeholders numbered after the previous
    /// ones', and the binders chained in the same order. The driver runs a
    /// whole script in one call to its worker thread, stopping at the first
    /// error, so a script is one round trip instead of one per statement.
    /// Run it inside a transaction to keep all or none. `None` for an empty
    /// list.
    pub fn script(writes: Vec<Write>) -> Option<Write> {
        Self::joined(Self::merged(writes), |sql, i, _, part| {
            if i > 0 {
                sql.push_str(";\n");
            }
            sql.push_str(part);
        })
    }

    /// Single-row inserts of one statement text as one multi-row insert:
    /// `INSERT INTO t (...) VALUES (<row 1>), (<row 2>), ...`, each row's
    /// placeholders numbered after the previous rows', the binders chained
    /// in the same order. One statement on both backends, with one plan
    /// however many rows. The writes come back unchanged (`Err`), to be run
    /// one by one, when they do not all share one text that ends with its
    /// `VALUES` tuple (nothing after it: no `ON CONFLICT`, no `RETURNING`),
    /// or when there are none.
    pub fn rows(writes: Vec<Write>) -> Result<Write, Vec<Write>> {
        let Some(first) = writes.first() else {
            return Err(writes);
        };
        if !first.merges()
            || writes
                .iter()
                .any(|w| w.sql != first.sql || w.repeat != first.repeat)
        {
            return Err(writes);
        }
        Ok(Self::merge_group(writes))
    }

    /// `writes` as one call to `backend`: [`Write::fold`] on Postgres,
    /// [`Write::script`] on SQLite.
    pub fn joined_for(backend: Backend, writes: Vec<Write>) -> Option<Write> {
        match backend {
            Backend::Postgres => Self::fold(writes),
            Backend::Sqlite => Self::script(writes),
        }
    }

    /// Joins `writes` with `put(sql, index, count, shifted part)`.
    fn joined(writes: Vec<Write>, put: impl Fn(&mut String, usize, usize, &str)) -> Option<Write> {
        let n = writes.len();
        let mut sql = String::new();
        let mut params = 0;
        let mut binds: Vec<BindWrite> = Vec::with_capacity(n);
        for (i, w) in writes.into_iter().enumerate() {
            put(&mut sql, i, n, &shift_placeholders(&w.sql, params));
            params += w.params;
            binds.push(w.bind);
        }
        if n == 0 {
            return None;
        }
        // Joined once: the result does not merge again.
        Some(Write {
            sql: sql.into(),
            params,
            bind: chained(binds),
            repeat: Vec::new(),
        })
    }
}

/// One binder running `binds` in order (a lone binder as it is).
fn chained(mut binds: Vec<BindWrite>) -> BindWrite {
    if binds.len() == 1 {
        if let Some(bind) = binds.pop() {
            return bind;
        }
    }
    Box::new(move |mut q| {
        for bind in binds {
            q = bind(q);
        }
        q
    })
}

/// The byte ranges of `parts` in `sql`, each the first occurrence after
/// the previous one, for [`Write::repeating`]. Empty if a part is missing
/// (the write then never merges).
pub fn sections(sql: &str, parts: &[&str]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(parts.len());
    let mut from = 0;
    for part in parts {
        let Some(at) = sql.get(from..).and_then(|rest| rest.find(part)) else {
            return Vec::new();
        };
        out.push(from + at..from + at + part.len());
        from = from + at + part.len();
    }
    out
}

/// The byte range of the tuple of `INSERT ... VALUES (<tuple>)` when the
/// statement ends with it (nothing after: no `ON CONFLICT`, no
/// `RETURNING`).
fn values_tuple(sql: &str) -> Option<Range<usize>> {
    let at = sql.rfind(" VALUES (")? + " VALUES ".len();
    if !sql.trim_start().starts_with("INSERT ") || !is_one_tuple(&sql[at..]) {
        return None;
    }
    Some(at..sql.trim_end().len())
}

/// Whether every placeholder `$n` of `sql` (outside quotes) lies in one of
/// `ranges`.
fn placeholders_only_in(sql: &str, ranges: &[Range<usize>]) -> bool {
    let bytes = sql.as_bytes();
    let mut quote: Option<u8> = None;
    for (i, &b) in bytes.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'$'
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                && !ranges.iter().any(|r| r.contains(&i)) =>
            {
                return false;
            }
            None => {}
        }
    }
    true
}

/// Whether `text` is one parenthesised group and nothing after it (text
/// in single quotes is skipped).
fn is_one_tuple(text: &str) -> bool {
    let mut depth = 0usize;
    let mut quoted = false;
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return text[i + 1..].trim().is_empty();
                }
            }
            _ => {}
        }
    }
    false
}

/// `sql` with every placeholder `$n` written `$(n + offset)`. Text in single
/// or double quotes is left as it is; `$` not followed by a digit is copied.
/// Dollar-quoted strings (`$$...$$`) are not recognised: a `$n` inside one
/// would be shifted too, so the statements given to it use none.
pub fn shift_placeholders(sql: &str, offset: usize) -> String {
    if offset == 0 {
        return sql.to_owned();
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.char_indices().peekable();
    let mut quote: Option<char> = None;
    while let Some((_, c)) = chars.next() {
        match quote {
            Some(q) => {
                out.push(c);
                if c == q {
                    quote = None;
                }
            }
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                out.push(c);
            }
            None if c == '$' && chars.peek().is_some_and(|(_, d)| d.is_ascii_digit()) => {
                let mut n: usize = 0;
                while let Some(&(_, d)) = chars.peek() {
                    let Some(v) = d.to_digit(10) else { break };
                    n = n.saturating_mul(10).saturating_add(v as usize);
                    chars.next();
                }
                out.push('$');
                out.push_str(&(n + offset).to_string());
            }
            None => out.push(c),
        }
    }
    out
}

/// Runs `writes` on `conn`, in order: on Postgres folded into one statement,
/// on SQLite as one script (one round trip either way). Run them inside
/// a transaction to have all or none.
pub async fn run_writes(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: Vec<Write>,
) -> Result<(), sqlx::Error> {
    if let Some(w) = Write::joined_for(backend, writes) {
        (w.bind)(sqlx::query(&w.sql)).execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_shift_outside_quotes_only() {
        assert_eq!(
            shift_placeholders("VALUES ($1, $2, '$3', \"$4\", $10, $$x$$)", 5),
            "VALUES ($6, $7, '$3', \"$4\", $15, $$x$$)"
        );
        assert_eq!(shift_placeholders("a = $1", 0), "a = $1");
        assert_eq!(
            shift_placeholders("x = 'it''s $1' AND y = $2", 1),
            "x = 'it''s $1' AND y = $3"
        );
    }

    fn w(sql: &'static str, params: usize) -> Write {
        Write::new(sql, params, |q| q)
    }

    #[test]
    fn rows_join_one_insert_into_many_rows() {
        let rows = Write::rows(vec![
            w("INSERT INTO a (x, y, z) VALUES ($1, 'k', $2, $1)", 2),
            w("INSERT INTO a (x, y, z) VALUES ($1, 'k', $2, $1)", 2),
            w("INSERT INTO a (x, y, z) VALUES ($1, 'k', $2, $1)", 2),
        ])
        .map(|w| (w.sql, w.params))
        .ok();
        assert_eq!(
            rows,
            Some((
                "INSERT INTO a (x, y, z) VALUES ($1, 'k', $2, $1), ($3, 'k', $4, $3), \
                 ($5, 'k', $6, $5)"
                    .into(),
                6
            ))
        );
        // Different statements, no VALUES tuple, or text after it: given
        // back, all of them, to run one by one.
        let back = |writes: Vec<Write>| Write::rows(writes).err().map(|w| w.len());
        assert_eq!(
            back(vec![
                w("INSERT INTO a (x) VALUES ($1)", 1),
                w("INSERT INTO b (x) VALUES ($1)", 1),
            ]),
            Some(2)
        );
        assert_eq!(back(vec![w("UPDATE a SET x = $1", 1)]), Some(1));
        assert_eq!(
            back(vec![w(
                "INSERT INTO a (x) VALUES ($1) ON CONFLICT (x) DO UPDATE SET x = (1)",
                1
            )]),
            Some(1)
        );
        assert_eq!(
            back(vec![w("INSERT INTO a (x) VALUES ($1) RETURNING x", 1)]),
            Some(1)
        );
        assert_eq!(back(Vec::new()), Some(0));
        // A closing parenthesis inside quotes does not end the tuple.
        assert!(Write::rows(vec![w("INSERT INTO a (x, y) VALUES ($1, ')')", 1)]).is_ok());
    }

    #[test]
    fn writes_of_one_text_merge_in_the_place_of_the_first() {
        let ins = || w("INSERT INTO a (x, y) VALUES ($1, $2)", 2);
        let upd = || w("UPDATE b SET x = $1", 1);
        let del = || w("DELETE FROM c WHERE x = $1", 1);
        let merged: Vec<(String, usize)> = Write::merged(vec![ins(), upd(), ins(), ins(), del()])
            .into_iter()
            .map(|w| (w.sql.into_owned(), w.params))
            .collect();
        assert_eq!(
            merged,
            vec![
                (
                    "INSERT INTO a (x, y) VALUES ($1, $2), ($3, $4), ($5, $6)".to_owned(),
                    6
                ),
                ("UPDATE b SET x = $1".to_owned(), 1),
                ("DELETE FROM c WHERE x = $1".to_owned(), 1),
            ]
        );
        // The group that holds the last write goes last (a statement's
        // result is its last part's).
        let order: Vec<String> = Write::merged(vec![ins(), upd(), ins()])
            .into_iter()
            .map(|w| w.sql.into_owned())
            .collect();
        assert_eq!(
            order,
            vec![
                "UPDATE b SET x = $1".to_owned(),
                "INSERT INTO a (x, y) VALUES ($1, $2), ($3, $4)".to_owned()
            ]
        );
        // Nothing to merge: the same writes, in the same order.
        let same: Vec<String> = Write::merged(vec![upd(), ins(), upd()])
            .into_iter()
            .map(|w| w.sql.into_owned())
            .collect();
        assert_eq!(
            same,
            vec![
                "UPDATE b SET x = $1",
                "INSERT INTO a (x, y) VALUES ($1, $2)",
                "UPDATE b SET x = $1"
            ]
        );
        // Folded: one part per text.
        let folded = Write::fold(vec![ins(), upd(), ins()]).map(|w| w.sql);
        assert_eq!(
            folded.as_deref(),
            Some("WITH w0 AS (UPDATE b SET x = $1) INSERT INTO a (x, y) VALUES ($2, $3), ($4, $5)")
        );
    }

    #[test]
    fn repeating_sections_hold_every_row() {
        const SQL: &str = "UPDATE t SET x = v.column2 FROM (VALUES ($1, CAST($2 AS BIGINT))) AS v \
                           WHERE t.id = v.column1 AND t.id IN ($1) AND t.k = 'a$1'";
        let row = || {
            Write::new(SQL, 2, |q| q).repeating(sections(SQL, &["($1, CAST($2 AS BIGINT))", "$1"]))
        };
        assert!(row().merges());
        let merged = Write::fold(vec![row(), row(), row()]).map(|w| (w.sql, w.params));
        assert_eq!(
            merged,
            Some((
                "UPDATE t SET x = v.column2 FROM (VALUES ($1, CAST($2 AS BIGINT)), \
                 ($3, CAST($4 AS BIGINT)), ($5, CAST($6 AS BIGINT))) AS v \
                 WHERE t.id = v.column1 AND t.id IN ($1, $3, $5) AND t.k = 'a$1'"
                    .into(),
                6
            ))
        );
        // A placeholder outside the sections, a missing part, or sections
        // out of order: kept, never merged.
        const OUT: &str = "UPDATE t SET x = $2 WHERE id IN ($1)";
        let outside = Write::new(OUT, 2, |q| q).repeating(sections(OUT, &["$1"]));
        assert!(!outside.merges());
        assert!(sections(SQL, &["($9)"]).is_empty());
        assert!(!Write::new(SQL, 2, |q| q)
            .repeating(vec![40..50, 10..20])
            .merges());
        let two = Write::fold(vec![
            Write::new("UPDATE t SET x = $2 WHERE id IN ($1)", 2, |q| q).repeating(Vec::new()),
            Write::new("UPDATE t SET x = $2 WHERE id IN ($1)", 2, |q| q).repeating(Vec::new()),
        ])
        .map(|w| w.sql);
        assert_eq!(
            two.as_deref(),
            Some("WITH w0 AS (UPDATE t SET x = $2 WHERE id IN ($1)) UPDATE t SET x = $4 WHERE id IN ($3)")
        );
        // Inserts merge only when every placeholder is in the tuple.
        assert!(!w("INSERT INTO a (x) SELECT $1 WHERE $2 VALUES ($3)", 3).merges());
        assert!(w("INSERT INTO a (x) VALUES ($1)", 1).merges());
        assert!(!w("INSERT INTO a (x) VALUES ($1) RETURNING x", 1).merges());
    }

    #[test]
    fn fold_numbers_each_part_after_the_last() {
        let one = Write::fold(vec![w("INSERT INTO a VALUES ($1)", 1)]).map(|w| w.sql);
        assert_eq!(one.as_deref(), Some("INSERT INTO a VALUES ($1)"));
        let three = Write::fold(vec![
            w("INSERT INTO a VALUES ($1, $2)", 2),
            w("UPDATE b SET x = $1", 1),
            w("INSERT INTO c VALUES ($1, $2, $1)", 2),
        ])
        .map(|w| (w.sql, w.params));
        assert_eq!(
            three,
            Some((
                "WITH w0 AS (INSERT INTO a VALUES ($1, $2)), w1 AS (UPDATE b SET x = $3) \
                 INSERT INTO c VALUES ($4, $5, $4)"
                    .into(),
                5
            ))
        );
        assert!(Write::fold(Vec::new()).is_none());
    }

    #[test]
    fn script_runs_statements_one_after_another() {
        let two = Write::script(vec![
            w("INSERT INTO a VALUES ($1, $2)", 2),
            w("UPDATE b SET x = $1 WHERE y = $2", 2),
        ])
        .map(|w| (w.sql, w.params));
        assert_eq!(
            two,
            Some((
                "INSERT INTO a VALUES ($1, $2);\nUPDATE b SET x = $3 WHERE y = $4".into(),
                4
            ))
        );
        assert!(Write::script(Vec::new()).is_none());
    }
}
