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
        Self {
            sql: sql.into(),
            params,
            bind: Box::new(bind),
        }
    }

    /// Postgres: `writes` as one statement. Every write but the last becomes
    /// a data-modifying `WITH` part (`w0`, `w1`, ...) ahead of the last, each
    /// one's placeholders numbered after the previous ones', and the binders
    /// chained in the same order. The parts share one snapshot, so none sees
    /// another's rows; all run to completion, or the statement fails and
    /// none is kept. `None` for an empty list.
    pub fn fold(writes: Vec<Write>) -> Option<Write> {
        Self::joined(writes, |sql, i, n, part| {
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
        Self::joined(writes, |sql, i, _, part| {
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
        let sql = first.sql.clone();
        let Some(tuple) = sql
            .rfind(" VALUES (")
            .map(|at| &sql[at + " VALUES ".len()..])
        else {
            return Err(writes);
        };
        if !is_one_tuple(tuple) || writes.iter().any(|w| w.sql != sql) {
            return Err(writes);
        }
        let head = &sql[..sql.len() - tuple.len()];
        let mut out = String::from(head);
        let mut params = 0;
        let mut binds: Vec<BindWrite> = Vec::with_capacity(writes.len());
        for (i, w) in writes.into_iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(&shift_placeholders(tuple, params));
            params += w.params;
            binds.push(w.bind);
        }
        Ok(Write::new(out, params, move |mut q| {
            for bind in binds {
                q = bind(q);
            }
            q
        }))
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
        if n == 1 {
            let bind = binds.pop()?;
            return Some(Write {
                sql: sql.into(),
                params,
                bind,
            });
        }
        Some(Write::new(sql, params, move |mut q| {
            for bind in binds {
                q = bind(q);
            }
            q
        }))
    }
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
