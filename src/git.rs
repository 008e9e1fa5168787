//! Where a directory sits in git, read from the files under `.git` without running `git`
//! (it costs microseconds): the work tree root, the common git directory shared by all
//! worktrees of a repository, and the branch. Only [`default_summary`] runs `git` (`log`
//! and `status`), once when a session starts, off the async runtime.

use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GitInfo {
    /// The top of the work tree.
    pub root: Option<String>,
    /// The repository's common git directory, canonical: equal for every worktree of one
    /// repository.
    pub common_dir: Option<String>,
    /// The checked-out branch, or `detached@<short sha>`.
    pub branch: Option<String>,
    /// The `origin` remote's URL, normalized ([`normalize_remote`]).
    pub remote: Option<String>,
}

impl GitInfo {
    /// Looks for a repository at `dir` or above it. Outside a repository all fields are
    /// `None`.
    pub fn discover(dir: &Path) -> Self {
        let mut cur = Some(dir);
        while let Some(d) = cur {
            let dot_git = d.join(".git");
            if let Some(git_dir) = resolve_git_dir(&dot_git) {
                let common = common_dir(&git_dir);
                let remote = origin(&common);
                return Self {
                    root: Some(d.display().to_string()),
                    common_dir: Some(
                        fs::canonicalize(&common)
                            .unwrap_or(common)
                            .display()
                            .to_string(),
                    ),
                    branch: branch(&git_dir),
                    remote,
                };
            }
            cur = d.parent();
        }
        Self::default()
    }
}

/// The `url` of `[remote "origin"]` in the repository's config, normalized.
fn origin(common_dir: &Path) -> Option<String> {
    let config = fs::read_to_string(common_dir.join("config")).ok()?;
    let mut in_origin = false;
    for line in config.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_origin = line.replace(' ', "") == "[remote\"origin\"]";
        } else if in_origin
            && let Some((key, value)) = line.split_once('=')
            && key.trim() == "url"
        {
            return normalize_remote(value.trim());
        }
    }
    None
}

/// A remote URL as `host/path`, the same for the SSH and HTTPS spellings of one
/// repository: `git@github.com:org/repo.git`, `ssh://git@github.com/org/repo` and
/// `https://github.com/org/repo` are all `github.com/org/repo`. `None` for a local path.
pub fn normalize_remote(url: &str) -> Option<String> {
    let url = url.trim().trim_end_matches('/');
    let url = url.strip_suffix(".git").unwrap_or(url);
    let (host, path) = match url.split_once("://") {
        Some((_, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            let (host, path) = rest.split_once('/')?;
            // A port is not part of the repository's name.
            (host.split(':').next().unwrap_or(host), path)
        }
        // scp-like: [user@]host:path
        None => {
            let (host, path) = url.split_once(':')?;
            if host.contains('/') {
                return None;
            }
            (host.rsplit_once('@').map_or(host, |(_, h)| h), path)
        }
    };
    let path = path.trim_start_matches('/');
    if host.is_empty() || path.is_empty() {
        return None;
    }
    Some(format!("{}/{path}", host.to_ascii_lowercase()))
}

/// A one-line description of what is going on in the repository at `dir`, made from
/// local git alone: repository and branch, the last commit subjects, the files changed
/// but not committed. `None` outside a repository or when `git` is not installed.
pub fn default_summary(dir: &Path, info: &GitInfo) -> Option<String> {
    let root = info.root.as_deref()?;
    let repo = Path::new(root)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| root.to_string());
    let git = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut summary = repo;
    if let Some(branch) = &info.branch {
        summary.push_str(&format!(" on {branch}"));
    }
    let subjects: Vec<String> = git(&["log", "-3", "--format=%s"])
        .unwrap_or_default()
        .lines()
        .map(|l| l.chars().take(60).collect())
        .collect();
    if !subjects.is_empty() {
        summary.push_str(&format!("; recent commits: {}", subjects.join(" | ")));
    }
    let changed: Vec<String> = git(&["status", "--porcelain", "--untracked-files=no"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.get(3..))
        .map(str::to_string)
        .collect();
    if !changed.is_empty() {
        let shown = changed
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let more = changed.len().saturating_sub(5);
        summary.push_str(&format!("; changed: {shown}"));
        if more > 0 {
            summary.push_str(&format!(" and {more} more"));
        }
    }
    Some(summary)
}

/// The git directory a `.git` entry stands for: itself when a directory, the target of
/// its `gitdir:` line when a file (worktrees, submodules).
fn resolve_git_dir(dot_git: &Path) -> Option<PathBuf> {
    let meta = fs::metadata(dot_git).ok()?;
    if meta.is_dir() {
        return dot_git.join("HEAD").exists().then(|| dot_git.to_path_buf());
    }
    let text = fs::read_to_string(dot_git).ok()?;
    let target = text.strip_prefix("gitdir:")?.trim();
    let path = Path::new(target);
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        dot_git.parent()?.join(path)
    })
}

/// A worktree's git directory names the shared one in its `commondir` file.
fn common_dir(git_dir: &Path) -> PathBuf {
    match fs::read_to_string(git_dir.join("commondir")) {
        Ok(text) => {
            let p = Path::new(text.trim());
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                git_dir.join(p)
            }
        }
        Err(_) => git_dir.to_path_buf(),
    }
}

fn branch(git_dir: &Path) -> Option<String> {
    let head = fs::read_to_string(git_dir.join("HEAD")).ok()?;
    let head = head.trim();
    match head.strip_prefix("ref:") {
        Some(r) => {
            let r = r.trim();
            Some(r.strip_prefix("refs/heads/").unwrap_or(r).to_string())
        }
        None => Some(format!("detached@{}", &head[..head.len().min(8)])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remotes_of_one_repository_read_alike() {
        for url in [
            "git@github.com:org/repo.git",
            "ssh://git@github.com:22/org/repo",
            "https://GitHub.com/org/repo.git/",
            "https://user@github.com/org/repo",
        ] {
            assert_eq!(
                normalize_remote(url).as_deref(),
                Some("github.com/org/repo"),
                "{url}"
            );
        }
        assert_eq!(normalize_remote("/srv/git/repo.git"), None);
    }

    #[test]
    fn reads_plain_repos_and_worktrees() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        let git = repo.join(".git");
        fs::create_dir_all(git.join("worktrees/wt")).unwrap();
        fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        fs::create_dir_all(repo.join("src/deep")).unwrap();

        let wt = tmp.path().join("wt");
        fs::create_dir_all(&wt).unwrap();
        fs::write(
            wt.join(".git"),
            format!("gitdir: {}\n", git.join("worktrees/wt").display()),
        )
        .unwrap();
        fs::write(git.join("worktrees/wt/HEAD"), "ref: refs/heads/feature/x\n").unwrap();
        fs::write(git.join("worktrees/wt/commondir"), "../..\n").unwrap();

        let a = GitInfo::discover(&repo.join("src/deep"));
        assert_eq!(a.root.as_deref(), Some(repo.to_str().unwrap()));
        assert_eq!(a.branch.as_deref(), Some("main"));
        let b = GitInfo::discover(&wt);
        assert_eq!(b.branch.as_deref(), Some("feature/x"));
        assert_eq!(a.common_dir, b.common_dir, "worktrees share the common dir");
        assert!(a.common_dir.is_some());
        assert_eq!(GitInfo::discover(tmp.path()), GitInfo::default());
    }
}
