//! A fresh PostgreSQL database per test on the local server (`E2E_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432`, trust auth), dropped with `DROP DATABASE … WITH
//! (FORCE)` when the handle is dropped or [`TestDatabase::cleanup`] is awaited.
//!
//! Not here: migrations. The dispatcher runs its own at start, which is part of what the
//! suites test.

use anyhow::Context;
use sqlx::Connection;

/// The server the databases are created on, without a database name.
pub fn server_url() -> String {
    std::env::var("E2E_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// One database, empty when created.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    dropped: bool,
}

impl TestDatabase {
    /// Creates `e2e_<random>` on the server.
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let admin_url = format!("{}/postgres", server_url());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url} (is PostgreSQL running? scripts/test.sh starts it)"))?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.context("CREATE DATABASE")?;
        let _ = admin.close().await;
        Ok(Self { url: format!("{}/{name}", server_url()), name, dropped: false })
    }

    /// `postgres://…/<name>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Drops the database now (closing its connections).
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        self.dropped = true;
        drop_database(&self.name).await
    }
}

async fn drop_database(name: &str) -> anyhow::Result<()> {
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url())).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
    let _ = admin.close().await;
    Ok(())
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // Drop may run inside a runtime that cannot block: do it on a thread of its own.
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(drop_database(&name))
        })
        .join();
        if let Ok(Err(error)) = done {
            eprintln!("e2e: could not drop database {}: {error:#}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn exists(name: &str) -> bool {
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url())).await.unwrap();
        let found: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
            .bind(name)
            .fetch_optional(&mut admin)
            .await
            .unwrap();
        found.is_some()
    }

    #[tokio::test]
    async fn created_then_dropped_even_with_open_connections() {
        let db = TestDatabase::create().await.unwrap();
        let name = db.name().to_owned();
        let mut open = sqlx::PgConnection::connect(db.url()).await.unwrap();
        sqlx::query("CREATE TABLE t (x int)").execute(&mut open).await.unwrap();
        assert!(exists(&name).await);
        db.cleanup().await.unwrap();
        assert!(!exists(&name).await);

        let db = TestDatabase::create().await.unwrap();
        let name = db.name().to_owned();
        drop(db);
        assert!(!exists(&name).await, "dropped on drop");
    }
}
