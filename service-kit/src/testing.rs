//! Throw-away databases for tests and the lab: a temporary directory of
//! SQLite files, or a fresh database on a Postgres server, one per test.

use sqlx::{Connection, Executor};

use resilience::store::{Backend, Db, DbOptions, StoreError};

/// The admin URL of the test Postgres server: `TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, empty place to keep state, removed by [`TestDatabase::cleanup`]
/// (Postgres) or when dropped (SQLite).
#[derive(Debug)]
pub struct TestDatabase {
    backend: Backend,
    admin_url: Option<String>,
    pg_url: Option<String>,
    pg_name: Option<String>,
    dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// Creates it: a temporary directory, or `CREATE DATABASE t_<uuid>` on
    /// the server of [`postgres_admin_url`].
    pub async fn create(backend: Backend) -> Result<Self, StoreError> {
        Self::create_on(backend, &postgres_admin_url(), "t").await
    }

    /// As [`TestDatabase::create`], on the Postgres server `admin_url` points
    /// at (any database the role may connect to), named `<prefix>_<uuid>`.
    pub async fn create_on(
        backend: Backend,
        admin_url: &str,
        prefix: &str,
    ) -> Result<Self, StoreError> {
        match backend {
            Backend::Sqlite => Ok(Self {
                backend,
                admin_url: None,
                pg_url: None,
                pg_name: None,
                dir: Some(tempfile::tempdir()?),
            }),
            Backend::Postgres => {
                let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(admin_url).await?;
                conn.execute(format!("CREATE DATABASE \"{name}\"").as_str())
                    .await?;
                conn.close().await?;
                Ok(Self {
                    backend,
                    admin_url: Some(admin_url.to_string()),
                    pg_url: Some(with_database(admin_url, &name)),
                    pg_name: Some(name),
                    dir: None,
                })
            }
        }
    }

    /// The Postgres database's name (`None` on SQLite).
    pub fn postgres_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }

    /// Which backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The `DATABASE_URL` for a component named `name`: its own SQLite file,
    /// or the shared Postgres database (components use schemas of their own).
    pub fn url(&self, name: &str) -> String {
        match (&self.dir, &self.pg_url) {
            (Some(dir), _) => format!("sqlite:{}", dir.path().join(format!("{name}.db")).display()),
            (None, Some(url)) => url.clone(),
            (None, None) => String::new(),
        }
    }

    /// Opens component `name`'s database with a small pool, in schema `schema`.
    pub async fn connect(&self, name: &str, schema: &str) -> Result<Db, StoreError> {
        let mut opts = DbOptions::new(self.url(name), schema);
        opts.max_connections = 4;
        Db::connect(&opts).await
    }

    /// Keeps the state instead of removing it, and says where it is: the
    /// SQLite directory, or the Postgres database's name.
    pub fn keep(mut self) -> String {
        match (self.dir.take(), &self.pg_name) {
            (Some(dir), _) => format!("SQLite files in {}", dir.keep().display()),
            (None, Some(name)) => format!("Postgres database {name}"),
            (None, None) => String::new(),
        }
    }

    /// Drops the Postgres database (forcing connections off); SQLite files go
    /// with the directory when `self` is dropped.
    pub async fn cleanup(self) {
        if let (Some(name), Some(admin)) = (&self.pg_name, &self.admin_url) {
            let drop = async {
                let mut conn = sqlx::PgConnection::connect(admin).await?;
                conn.execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
                    .await?;
                conn.close().await
            };
            if let Err(e) = drop.await {
                tracing::warn!(database = %name, error = %e, "could not drop test database");
            }
        }
    }
}

/// `url` with its database name replaced by `name` (query string kept).
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| i + authority);
    let mut out = format!("{}/{}", &base[..path], name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_database_name() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres?sslmode=disable", "t_1"),
            "postgres://u@h:5432/t_1?sslmode=disable"
        );
        assert_eq!(super::with_database("postgres://h", "x"), "postgres://h/x");
    }
}
