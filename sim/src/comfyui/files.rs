//! The simulator's input, output and temp folders, owned by a temp dir that
//! disappears with the simulator, and ComfyUI's file naming rules.

use std::{
    io,
    path::{Component, Path, PathBuf},
};

use sha2::{Digest, Sha256};

/// Folders of one simulator instance.
#[derive(Debug)]
pub(crate) struct Files {
    _root: tempfile::TempDir,
    input: PathBuf,
    output: PathBuf,
    temp: PathBuf,
}

impl Files {
    pub fn create() -> io::Result<Files> {
        let root = tempfile::Builder::new()
            .prefix("multiplex-comfy-sim")
            .tempdir()?;
        let [input, output, temp] = ["input", "output", "temp"].map(|d| root.path().join(d));
        for dir in [&input, &output, &temp] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(Files {
            _root: root,
            input,
            output,
            temp,
        })
    }

    /// The folder behind a `type` parameter (`input`, `output`, `temp`).
    pub fn folder(&self, kind: &str) -> Option<&Path> {
        match kind {
            "input" => Some(&self.input),
            "output" => Some(&self.output),
            "temp" => Some(&self.temp),
            _ => None,
        }
    }

    /// The file `/view` should serve, if the names stay inside the folder.
    pub fn view_path(&self, filename: &str, subfolder: &str, kind: &str) -> Option<PathBuf> {
        let base = self.folder(kind)?;
        let relative = Path::new(subfolder).join(filename);
        safe_join(base, &relative)
    }

    /// Whether LoadImage's `image` names an existing input file; accepts
    /// ComfyUI's `name [input]` / `name [output]` annotations.
    pub fn input_exists(&self, annotated: &str) -> bool {
        self.input_path(annotated).is_some_and(|p| p.is_file())
    }

    /// Resolves LoadImage's `image` value to a path.
    pub fn input_path(&self, annotated: &str) -> Option<PathBuf> {
        let (name, kind) = match annotated
            .strip_suffix(']')
            .and_then(|s| s.rsplit_once(" ["))
        {
            Some((name, kind)) => (name, kind),
            None => (annotated, "input"),
        };
        safe_join(self.folder(kind)?, Path::new(name))
    }

    /// Every uploaded file, relative to the input folder, sorted.
    pub fn input_files(&self) -> Vec<String> {
        let mut found = Vec::new();
        collect(&self.input, &self.input, &mut found);
        found.sort();
        found
    }

    /// Stores an upload under ComfyUI's rules: overwrite when asked,
    /// otherwise reuse a same-named file with identical bytes, or pick
    /// `name (1).ext`, `name (2).ext`... Returns the stored name.
    pub fn store_upload(
        &self,
        kind: &str,
        subfolder: &str,
        filename: &str,
        bytes: &[u8],
        overwrite: bool,
    ) -> Option<io::Result<String>> {
        let folder = safe_join(self.folder(kind)?, Path::new(subfolder))?;
        let mut name = filename.to_owned();
        let mut path = safe_join(&folder, Path::new(&name))?;
        let (stem, ext) = split_ext(filename);
        let mut attempt = 1;
        while !overwrite && path.exists() {
            if std::fs::read(&path).is_ok_and(|old| same_bytes(&old, bytes)) {
                return Some(Ok(name));
            }
            name = format!("{stem} ({attempt}){ext}");
            path = folder.join(&name);
            attempt += 1;
        }
        let written = std::fs::create_dir_all(&folder).and_then(|()| std::fs::write(&path, bytes));
        Some(written.map(|()| name))
    }

    /// Next free `prefix_NNNNN_.ext` in `kind`, creating the subfolder a
    /// `sub/prefix` names. Returns (subfolder, file name, full path).
    pub fn next_save_path(&self, kind: &str, prefix: &str, ext: &str) -> Option<SavePath> {
        let (subfolder, stem) = match prefix.rsplit_once('/') {
            Some((sub, stem)) => (sub.to_owned(), stem.to_owned()),
            None => (String::new(), prefix.to_owned()),
        };
        let folder = safe_join(self.folder(kind)?, Path::new(&subfolder))?;
        std::fs::create_dir_all(&folder).ok()?;
        let counter = highest_counter(&folder, &stem) + 1;
        Some(SavePath {
            subfolder,
            stem,
            folder,
            counter,
            ext: ext.to_owned(),
        })
    }
}

/// Where a save node writes, and its running counter.
pub(crate) struct SavePath {
    pub subfolder: String,
    stem: String,
    folder: PathBuf,
    counter: u32,
    ext: String,
}

impl SavePath {
    /// Claims the next file name: `(name, path)`.
    pub fn claim(&mut self) -> (String, PathBuf) {
        let name = format!("{}_{:05}_.{}", self.stem, self.counter, self.ext);
        self.counter += 1;
        let path = self.folder.join(&name);
        (name, path)
    }
}

fn highest_counter(folder: &Path, stem: &str) -> u32 {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(stem)?.strip_prefix('_')?;
            rest.get(..5)?.parse::<u32>().ok()
        })
        .max()
        .unwrap_or(0)
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && Sha256::digest(a) == Sha256::digest(b)
}

fn split_ext(name: &str) -> (&str, &str) {
    match name.rfind('.') {
        Some(dot) if dot > 0 => (&name[..dot], &name[dot..]),
        _ => (name, ""),
    }
}

/// Joins `relative` under `base`, refusing absolute paths and `..`.
fn safe_join(base: &Path, relative: &Path) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    for part in relative.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn collect(base: &Path, dir: &Path, found: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            collect(base, &path, found);
        } else if let Ok(rel) = path.strip_prefix(base) {
            found.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_dedup_and_rename() {
        let files = Files::create().unwrap();
        let first = files
            .store_upload("input", "", "a.png", b"one", false)
            .unwrap()
            .unwrap();
        let same = files
            .store_upload("input", "", "a.png", b"one", false)
            .unwrap()
            .unwrap();
        let other = files
            .store_upload("input", "", "a.png", b"two", false)
            .unwrap()
            .unwrap();
        assert_eq!((first.as_str(), same.as_str()), ("a.png", "a.png"));
        assert_eq!(other, "a (1).png");
        assert!(files
            .store_upload("input", "../x", "a.png", b"", false)
            .is_none());
    }

    #[test]
    fn save_paths_count_up() {
        let files = Files::create().unwrap();
        let mut save = files.next_save_path("output", "rec", "png").unwrap();
        let (name, path) = save.claim();
        assert_eq!(name, "rec_00001_.png");
        std::fs::write(path, b"x").unwrap();
        let mut again = files.next_save_path("output", "rec", "png").unwrap();
        assert_eq!(again.claim().0, "rec_00002_.png");
    }
}
