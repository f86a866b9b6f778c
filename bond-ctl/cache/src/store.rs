//! The cache on disk: objects named by their BLAKE3 hash, an index from
//! URL to object, least recently used first out when the size bound is
//! passed.
//!
//! ```text
//! <dir>/objects/<hash>   the bytes
//! <dir>/tmp/<n>.part     being fetched
//! <dir>/index.json       what is held, in least-recently-used order
//! ```
//!
//! An object being uploaded when it is evicted is still read to its end:
//! the upload holds the file open.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use anyhow::{Context as _, Result};

use super::msg::Object;

pub struct Store {
    dir: PathBuf,
    max_bytes: u64,
    next_part: AtomicU64,
    inner: Mutex<Lru>,
}

/// The bookkeeping, apart from the files: objects by URL (two URLs may
/// hold the same bytes, one file).
#[derive(Default)]
pub struct Lru {
    by_url: HashMap<String, (Object, u64)>,
    by_hash: HashMap<String, BTreeSet<String>>,
    /// Use tick -> URL, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl Lru {
    fn touch(&mut self, url: &str) {
        if let Some((_, t)) = self.by_url.get_mut(url) {
            self.tick += 1;
            self.order.remove(t);
            *t = self.tick;
            self.order.insert(self.tick, url.to_string());
        }
    }

    /// Adds `obj` (a new version of a URL replaces the old one), then
    /// evicts the least recently used others until `max` bytes hold; what
    /// was evicted.
    pub fn insert(&mut self, obj: Object, max: u64) -> Vec<Object> {
        let url = obj.url.clone();
        self.remove(&url);
        self.bytes = self.bytes.saturating_add(obj.size);
        self.by_hash
            .entry(obj.hash.clone())
            .or_default()
            .insert(url.clone());
        self.by_url.insert(url.clone(), (obj, 0));
        self.touch(&url);
        let mut out = Vec::new();
        while self.bytes > max {
            let Some(oldest) = self.order.values().next().cloned() else {
                break;
            };
            if oldest == url {
                break;
            }
            out.extend(self.remove(&oldest));
        }
        out
    }

    pub fn remove(&mut self, url: &str) -> Option<Object> {
        let (obj, t) = self.by_url.remove(url)?;
        self.order.remove(&t);
        if let Some(urls) = self.by_hash.get_mut(&obj.hash) {
            urls.remove(url);
            if urls.is_empty() {
                self.by_hash.remove(&obj.hash);
            }
        }
        self.bytes = self.bytes.saturating_sub(obj.size);
        Some(obj)
    }

    fn get(&self, url: &str) -> Option<&Object> {
        self.by_url.get(url).map(|(o, _)| o)
    }

    /// A URL whose content is `hash`.
    fn url_of(&self, hash: &str) -> Option<String> {
        self.by_hash.get(hash)?.iter().next().cloned()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<Object> {
        self.order
            .values()
            .filter_map(|u| self.get(u).cloned())
            .collect()
    }
}

impl Store {
    /// Opens (or makes) the cache in `dir`, keeping what its index lists
    /// and is still there whole; parts of interrupted fetches are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self> {
        for sub in ["objects", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        for e in std::fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let s = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            next_part: AtomicU64::new(0),
            inner: Mutex::new(Lru::default()),
        };
        let index: Vec<Object> = match std::fs::read(dir.join("index.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!("cache: index unreadable ({e}): starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        {
            let mut lru = s.inner.lock().expect("lock");
            for o in index {
                let whole = Object::hash_ok(&o.hash)
                    && std::fs::metadata(s.path_of(&o.hash)).is_ok_and(|m| m.len() == o.size);
                if whole {
                    lru.insert(o, max_bytes);
                }
            }
        }
        s.sweep()?;
        Ok(s)
    }

    pub fn path_of(&self, hash: &str) -> PathBuf {
        self.dir.join("objects").join(hash)
    }

    /// A fresh path to fetch into.
    pub fn part(&self) -> PathBuf {
        let n = self.next_part.fetch_add(1, Ordering::Relaxed);
        self.dir.join("tmp").join(format!("{n}.part"))
    }

    /// The object cached for `url`, marked used.
    pub fn by_url(&self, url: &str) -> Option<Object> {
        let mut lru = self.inner.lock().expect("lock");
        lru.touch(url);
        lru.get(url).cloned()
    }

    /// The object with content `hash`, marked used.
    pub fn by_hash(&self, hash: &str) -> Option<Object> {
        let mut lru = self.inner.lock().expect("lock");
        let url = lru.url_of(hash)?;
        lru.touch(&url);
        lru.get(&url).cloned()
    }

    /// Moves the verified `part` in as `obj`; what was evicted to make
    /// room. An object larger than the whole cache is not kept.
    pub fn insert(&self, obj: Object, part: &Path) -> Result<Vec<Object>> {
        if obj.size > self.max_bytes {
            let _ = std::fs::remove_file(part);
            return Ok(Vec::new());
        }
        std::fs::rename(part, self.path_of(&obj.hash))
            .with_context(|| format!("storing {}", obj.url))?;
        let evicted = self.inner.lock().expect("lock").insert(obj, self.max_bytes);
        self.sweep()?;
        Ok(evicted)
    }

    /// The origin confirmed `url` unchanged at `now_ms`.
    pub fn revalidated(&self, url: &str, now_ms: u64) {
        if let Some((o, _)) = self.inner.lock().expect("lock").by_url.get_mut(url) {
            o.fetched_ms = now_ms;
        }
    }

    /// Drops every URL whose content is `hash` (found bad); what went.
    pub fn remove_hash(&self, hash: &str) -> Vec<Object> {
        let mut gone = Vec::new();
        {
            let mut lru = self.inner.lock().expect("lock");
            while let Some(url) = lru.url_of(hash) {
                gone.extend(lru.remove(&url));
            }
        }
        let _ = self.sweep();
        gone
    }

    pub fn list(&self) -> Vec<Object> {
        self.inner.lock().expect("lock").list()
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().expect("lock").bytes()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Removes the files of objects no longer listed and writes the index.
    fn sweep(&self) -> Result<()> {
        let list = self.list();
        let keep: std::collections::HashSet<&str> = list.iter().map(|o| o.hash.as_str()).collect();
        for e in std::fs::read_dir(self.dir.join("objects"))?.flatten() {
            if !keep.contains(e.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let tmp = self.dir.join("index.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
        std::fs::rename(&tmp, self.dir.join("index.json"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(url: &str, data: &[u8]) -> Object {
        Object {
            url: url.into(),
            validator: None,
            hash: blake3::hash(data).to_hex().to_string(),
            size: data.len() as u64,
            content_type: None,
            fetched_ms: 1,
        }
    }

    #[test]
    fn least_recently_used_goes_first() {
        let mut lru = Lru::default();
        let (a, b, c, d) = (
            obj("a", &[1; 40]),
            obj("b", &[2; 40]),
            obj("c", &[3; 40]),
            obj("d", &[4; 40]),
        );
        for o in [&a, &b, &c] {
            assert!(lru.insert(o.clone(), 120).is_empty());
        }
        lru.touch("a");
        let out = lru.insert(d.clone(), 120);
        assert_eq!(out, vec![b.clone()]);
        assert_eq!(lru.bytes(), 120);
        let urls: Vec<_> = lru.list().into_iter().map(|o| o.url).collect();
        assert_eq!(urls, ["c", "a", "d"]);
        // Something larger than the rest together evicts them all but
        // never itself.
        let big = obj("big", &[5; 100]);
        let out = lru.insert(big.clone(), 120);
        assert_eq!(out.len(), 3);
        assert_eq!(lru.list(), vec![big]);
    }

    #[test]
    fn a_new_version_replaces_the_old() {
        let mut lru = Lru::default();
        lru.insert(obj("u", b"one"), 100);
        lru.insert(obj("u", b"two!"), 100);
        assert_eq!(lru.bytes(), 4);
        assert_eq!(lru.list(), vec![obj("u", b"two!")]);
        // The same again is a use, not a second copy.
        lru.insert(obj("u", b"two!"), 100);
        assert_eq!(lru.bytes(), 4);
        // Another URL with the same bytes: one file, two entries.
        lru.insert(obj("v", b"two!"), 100);
        assert_eq!(lru.url_of(&obj("u", b"two!").hash).as_deref(), Some("u"));
        lru.remove("u");
        assert_eq!(lru.url_of(&obj("u", b"two!").hash).as_deref(), Some("v"));
    }

    #[test]
    fn the_store_survives_a_restart_and_drops_what_is_not_whole() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 1000).unwrap();
        for (url, data) in [("x", &b"xx"[..]), ("y", b"yyy")] {
            let part = s.part();
            std::fs::write(&part, data).unwrap();
            s.insert(obj(url, data), &part).unwrap();
        }
        std::fs::write(s.part(), b"half").unwrap();
        // y is damaged behind the store's back.
        std::fs::write(s.path_of(&obj("y", b"yyy").hash), b"y").unwrap();
        drop(s);
        let s = Store::open(dir.path(), 1000).unwrap();
        assert_eq!(s.list(), vec![obj("x", b"xx")]);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("objects"))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(s.by_url("x").unwrap().size, 2);
        assert_eq!(s.remove_hash(&obj("x", b"xx").hash).len(), 1);
        assert!(s.by_url("x").is_none());
    }
}
