#!/usr/bin/env bash
# Install edgeagent on a board (Raspberry Pi OS bookworm, JetPack 6, or any 64-bit glibc Linux):
# user, directories, venv under /opt/edgeagent, config for the detected board, systemd units.
# Idempotent: a second run changes nothing. Every change goes through `run`, so --dry-run shows
# exactly what a real run would do. See docs/install.md.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/install.sh [options]
       scripts/install.sh --uninstall [--purge] [--prefix DIR] [--dry-run]

  --prefix DIR          install below DIR (like DESTDIR: files go under DIR, units keep the real
                        paths). Nothing outside DIR changes: no user is created (an existing one
                        owns the files), no systemctl; output names paths below DIR (default /)
  --config FILE         agent config to install as /etc/edgeagent/config.toml
                        (default: configs/<board>.toml; an existing edited config is kept)
  --board NAME          raspberry-pi | jetson | default (default: detected)
  --user NAME           service user (default edgeagent; another name adds a unit drop-in)
  --no-user             do not create the user (it must exist, or files stay root's)
  --python PY           interpreter for the venv (default python3)
  --runtime NAME        auto | tflite | litert | none: TFLite runtime extra (default auto:
                        tflite-runtime on Python <= 3.11, ai-edge-litert from 3.12)
  --wheel FILE          install this edgeagent wheel instead of building one from the source tree
  --venv-from DIR       use an existing venv (linked as /opt/edgeagent/venv) instead of building one
  --no-venv             skip the venv step
  --installer-preset P  rauc | swupdate | mender | script for a new installer.toml (default: detected)
  --trusted-key ID=PEM  install the update-signing public key PEM as /etc/edgeagent/keys/ID.pem
                        (root, 0644; repeatable) and trust it in a new installer.toml: the root
                        helper installs only firmware whose manifest one of these keys signed
  --min-free-mb N       free space needed below the prefix (default 400)
  --skip-checks         install even if the board checks fail
  --dry-run             print every step without doing it
  --uninstall           remove what install added; keeps the state dir (and the user) unless --purge
  --purge               with --uninstall: also remove the state dir, logs and the user
  -h, --help
EOF
}

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX=/ CONFIG_SRC="" BOARD="" SVC_USER=edgeagent CREATE_USER=1 PYTHON=python3 RUNTIME=auto
WHEEL="" VENV_FROM="" NO_VENV=0 PRESET="" TRUSTED_KEYS=() MIN_FREE_MB=400 SKIP_CHECKS=0 DRY_RUN=0 UNINSTALL=0 PURGE=0
DETECT_ROOT="${EDGEAGENT_DETECT_ROOT:-}"  # tests point board detection at a fake /proc and /etc

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="$2"; shift ;;
        --config) CONFIG_SRC="$2"; shift ;;
        --board) BOARD="$2"; shift ;;
        --user) SVC_USER="$2"; shift ;;
        --no-user) CREATE_USER=0 ;;
        --python) PYTHON="$2"; shift ;;
        --runtime) RUNTIME="$2"; shift ;;
        --wheel) WHEEL="$2"; shift ;;
        --venv-from) VENV_FROM="$2"; shift ;;
        --no-venv) NO_VENV=1 ;;
        --installer-preset) PRESET="$2"; shift ;;
        --trusted-key) TRUSTED_KEYS+=("$2"); shift ;;
        --min-free-mb) MIN_FREE_MB="$2"; shift ;;
        --skip-checks) SKIP_CHECKS=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "==> $*"; }
ok() { echo "    ok: $*"; }

case "$RUNTIME" in auto|tflite|litert|none) ;; *) die "--runtime must be auto, tflite, litert or none" ;; esac
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
for k in "${TRUSTED_KEYS[@]+"${TRUSTED_KEYS[@]}"}"; do
    [[ "$k" =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}=.+ ]] || die "--trusted-key $k: expected ID=FILE (ID: A-Z a-z 0-9 . _ -)"
    [ -f "${k#*=}" ] || die "--trusted-key $k: no such file"
    grep -q -- "-----BEGIN PUBLIC KEY-----" "${k#*=}" || die "--trusted-key $k: not a PEM public key (openssl pkey -pubout)"
done

# Final paths (as the units see them) and where they land below the prefix.
OPT=/opt/edgeagent VENV=/opt/edgeagent/venv ETC=/etc/edgeagent STATE=/var/lib/edgeagent
LOGS=/var/log/edgeagent UNITDIR=/etc/systemd/system MANIFEST=/opt/edgeagent/install-manifest
UNITS=(edgeagent.service edgeagent-installer.service edgeagent-installer.path)
case "$PREFIX" in /*) ;; *) PREFIX="$(pwd)/$PREFIX" ;; esac
PREFIX="${PREFIX%/}"
P() { printf '%s%s' "$PREFIX" "$1"; }

IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1
SYSTEMD=0; [ -z "$PREFIX" ] && [ -d /run/systemd/system ] && SYSTEMD=1
CHANGED_UNITS=0

run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '    [dry-run] %s\n' "$*"
    else
        printf '    + %s\n' "$*"
        "$@"
    fi
}

# ---------------------------------------------------------------- manifest of what we added
# Lines "kind sha256|- path" (path as on the target). Merged with the previous run's, so a second
# run records the same set even though it creates nothing.
declare -a RECORDS=()
record() {
    local line="$1 $2 $3" r
    for r in "${RECORDS[@]+"${RECORDS[@]}"}"; do [ "$r" = "$line" ] && return 0; done
    # A newer checksum for the same path replaces the old line.
    local -a kept=()
    for r in "${RECORDS[@]+"${RECORDS[@]}"}"; do [ "${r##* }" = "$3" ] || kept+=("$r"); done
    RECORDS=("${kept[@]+"${kept[@]}"}" "$line")
}
load_manifest() {
    local f; f="$(P "$MANIFEST")"
    [ -f "$f" ] || return 0
    while IFS= read -r line; do [ -n "$line" ] && RECORDS+=("$line"); done <"$f"
}

owner_of() { if [ "$IS_ROOT" = 1 ]; then echo "$1"; else id -un; fi; }

# ensure_dir PATH MODE OWNER GROUP [kind]: create (with missing parents) or fix mode/owner.
ensure_dir() {
    local path="$1" mode="$2" own grp kind="${5:-dir}" target
    own="$(owner_of "$3")" grp="$(owner_of "$4")"
    [ "$IS_ROOT" = 1 ] || grp="$(id -gn)"
    target="$(P "$path")"
    ensure_parents "$path"
    if [ -d "$target" ] && [ ! -L "$target" ]; then
        if [ "$(stat -c '%a %U %G' "$target")" = "${mode#0} $own $grp" ]; then
            ok "$target"
        elif [ "$IS_ROOT" = 1 ]; then
            run chmod "$mode" "$target"; run chown "$own:$grp" "$target"
        else
            run chmod "$mode" "$target"
        fi
    elif [ "$IS_ROOT" = 1 ]; then
        run install -d -m "$mode" -o "$own" -g "$grp" "$target"
    else
        run install -d -m "$mode" "$target"
    fi
    planned "$path"
    record "$kind" - "$path"
}

# A dry run creates nothing, so it remembers the directories it would have made.
PLANNED=" "
is_dir() { [ -d "$(P "$1")" ] || case "$PLANNED" in *" $1 "*) true ;; *) false ;; esac; }
planned() { [ "$DRY_RUN" = 1 ] && PLANNED="$PLANNED$1 "; return 0; }

# Create the missing parents of PATH below the prefix, recording each one we create.
ensure_parents() {
    local parent="${1%/*}" missing=() d
    while [ -n "$parent" ] && ! is_dir "$parent"; do
        missing=("$parent" "${missing[@]+"${missing[@]}"}"); parent="${parent%/*}"
    done
    for d in "${missing[@]+"${missing[@]}"}"; do
        run install -d -m 0755 "$(P "$d")"
        planned "$d"
        record dir - "$d"
    done
}

# ensure_file SRC PATH MODE OWNER GROUP [kind]: copy if the content, mode or owner differ.
ensure_file() {
    local src="$1" path="$2" mode="$3" own grp kind="${6:-file}" target sum
    own="$(owner_of "$4")" grp="$(owner_of "$5")"
    [ "$IS_ROOT" = 1 ] || grp="$(id -gn)"
    target="$(P "$path")"
    sum="$(sha256sum <"$src" | cut -d' ' -f1)"
    ensure_parents "$path"
    if [ -f "$target" ] && cmp -s "$src" "$target" \
        && [ "$(stat -c '%a %U %G' "$target")" = "${mode#0} $own $grp" ]; then
        ok "$target"
    else
        if [ "$IS_ROOT" = 1 ]; then
            run install -m "$mode" -o "$own" -g "$grp" "$src" "$target"
        else
            run install -m "$mode" "$src" "$target"
        fi
        case "$path" in "$UNITDIR"/*) CHANGED_UNITS=1 ;; esac
    fi
    record "$kind" "$sum" "$path"
}

# ensure_config SRC PATH MODE OWNER GROUP EXPLICIT: like ensure_file, but a config the operator
# edited is kept, unless they name a new one with --config (then the old one is backed up).
ensure_config() {
    local src="$1" path="$2" target; target="$(P "$path")"
    if [ -f "$target" ] && ! cmp -s "$src" "$target"; then
        if [ "$6" = 1 ]; then
            run cp -p "$target" "$target.bak"
        else
            ok "$target (kept: differs from $src, edited locally)"
            return 0
        fi
    fi
    ensure_file "$src" "$path" "$3" "$4" "$5" conf
}

# ---------------------------------------------------------------- board checks and detection
detect_board() {
    local model=""
    [ -r "$DETECT_ROOT/proc/device-tree/model" ] && model="$(tr -d '\0' <"$DETECT_ROOT/proc/device-tree/model")"
    case "$model" in
        *"Raspberry Pi"*) echo raspberry-pi; return ;;
        *Jetson*|*NVIDIA*) echo jetson; return ;;
    esac
    if [ -e "$DETECT_ROOT/etc/nv_tegra_release" ]; then echo jetson; else echo default; fi
}

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

check_board() {
    local arch py glibc free_mb fails=0 where
    arch="$(uname -m)"
    case "$arch" in
        aarch64|x86_64) ok "arch $arch" ;;
        armv7l|armv6l) echo "    FAIL: arch $arch: no numpy/psutil/cryptography wheels on PyPI for 32-bit ARM;" \
            "install the 64-bit OS image (or build wheels yourself, see docs/install.md)"; fails=1 ;;
        *) echo "    FAIL: arch $arch is not supported (aarch64, x86_64)"; fails=1 ;;
    esac
    if [ "$NO_VENV" = 0 ] && [ -z "$VENV_FROM" ]; then
        if ! py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
            echo "    FAIL: $PYTHON not found (install python3 and python3-venv)"; fails=1
        elif version_ge "$py" 3.10; then
            ok "python $py ($PYTHON)"
            "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
                || { echo "    FAIL: $PYTHON lacks venv/ensurepip (apt install python3-venv)"; fails=1; }
        else
            echo "    FAIL: python $py: edgeagent needs 3.10+"; fails=1
        fi
    fi
    glibc="$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
    if [ -z "$glibc" ]; then
        echo "    FAIL: not a glibc system (musl has no manylinux wheels)"; fails=1
    elif version_ge "$glibc" 2.34; then
        ok "glibc $glibc"
    else
        echo "    FAIL: glibc $glibc: cryptography and tflite-runtime wheels need 2.34+ (bookworm, Ubuntu 22.04)"
        fails=1
    fi
    where="$PREFIX/"; while [ ! -d "$where" ]; do where="$(dirname "$where")"; done
    free_mb="$(df -Pm "$where" | awk 'NR==2 {print $4}')"
    if [ "${free_mb:-0}" -ge "$MIN_FREE_MB" ]; then
        ok "free space ${free_mb} MB below ${PREFIX:-/}"
    else
        echo "    FAIL: ${free_mb} MB free below ${PREFIX:-/}, need ${MIN_FREE_MB} MB"; fails=1
    fi
    if [ "$fails" = 1 ]; then
        [ "$SKIP_CHECKS" = 1 ] || die "board checks failed"
        echo "    (--skip-checks: going on anyway)"
    fi
}

detect_preset() {
    if command -v rauc >/dev/null; then echo rauc
    elif command -v swupdate >/dev/null; then echo swupdate
    elif command -v mender-update >/dev/null || command -v mender >/dev/null; then echo mender
    else echo script; fi
}

# ---------------------------------------------------------------- install steps
step_user() {
    if [ -n "$PREFIX" ]; then
        # A prefix is another system's tree (an image, a chroot): its users are not ours to make,
        # and nothing outside the prefix may change. An existing user of that name owns the files.
        ok "user step skipped (--prefix: create the system user $SVC_USER on the target system)"; return 0
    fi
    if [ "$CREATE_USER" = 0 ]; then
        ok "user step skipped (--no-user)"; return 0
    fi
    if [ "$IS_ROOT" = 0 ]; then
        ok "user step skipped (not root)"; return 0
    fi
    if getent passwd "$SVC_USER" >/dev/null; then
        ok "user $SVC_USER exists"
        # A user we created in an earlier run stays ours (so --purge removes it).
        grep -qx "user - $SVC_USER" "$(P "$MANIFEST")" 2>/dev/null && record user - "$SVC_USER"
    else
        run useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "edgeagent service" "$SVC_USER"
        record user - "$SVC_USER"
    fi
    # vcgencmd (Pi throttling flags) needs /dev/vchiq, group video.
    if getent group video >/dev/null; then
        if id -nG "$SVC_USER" 2>/dev/null | tr ' ' '\n' | grep -qx video; then
            ok "$SVC_USER in group video"
        else
            run usermod -aG video "$SVC_USER"
        fi
    fi
}

# Owner of the agent's files: the service user once it exists (in a dry run: as it would).
agent_user() {
    if [ "$CREATE_USER" = 1 ] && { getent passwd "$SVC_USER" >/dev/null || { [ "$DRY_RUN" = 1 ] && [ -z "$PREFIX" ]; }; }; then
        echo "$SVC_USER"
    else
        echo root
    fi
}
agent_group() { agent_user; }

step_dirs() {
    local u g; u="$(agent_user)" g="$(agent_group)"
    ensure_dir "$OPT" 0755 root root
    ensure_dir "$ETC" 0755 root root
    ensure_dir "$ETC/tls" 0750 root "$g"
    ensure_dir "$ETC/keys" 0755 root root  # trusted update-signing public keys (updates.trusted_keys)
    ensure_dir "$STATE" 0750 "$u" "$g" state
    ensure_dir "$STATE/installer" 0750 "$u" "$g" state
    ensure_dir "$STATE/updates" 0750 "$u" "$g" state
    ensure_dir /var/lib/edgeagent-installer 0700 root root state  # the root helper's staging area
    ensure_dir "$LOGS" 0750 "$u" "$g"
}

runtime_extra() {
    local py="$1"
    case "$RUNTIME" in
        none) echo "" ;;
        tflite|litert) echo "$RUNTIME" ;;
        *) if version_ge 3.11 "$py"; then echo tflite; else echo litert; fi ;;  # auto
    esac
}

# Say which TFLite runtime the venv gets and why: tflite-runtime has wheels up to CPython 3.11
# (Pi OS bookworm), LiteRT (ai-edge-litert) from 3.12 (Pi OS trixie ships 3.13).
say_runtime() {
    local py="$1" extra="$2" why
    case "$RUNTIME" in
        auto) why="auto: Python $py $(version_ge 3.11 "$py" && echo "<=" || echo ">") 3.11" ;;
        *) why="--runtime $RUNTIME" ;;
    esac
    case "$extra" in
        tflite) ok "TFLite runtime: tflite-runtime ([tflite] extra; $why)" ;;
        litert) ok "TFLite runtime: ai-edge-litert (LiteRT, [litert] extra; $why)" ;;
        *) ok "TFLite runtime: none ($why): the agent runs without inference" ;;
    esac
}

step_venv() {
    local venv; venv="$(P "$VENV")"
    if [ "$NO_VENV" = 1 ]; then
        ok "venv step skipped (--no-venv)"; return 0
    fi
    if [ -n "$VENV_FROM" ]; then
        VENV_FROM="$(cd "$VENV_FROM" && pwd)"
        [ -x "$VENV_FROM/bin/python" ] || die "--venv-from $VENV_FROM: no bin/python"
        "$VENV_FROM/bin/python" -c 'import edgeagent' 2>/dev/null || die "--venv-from $VENV_FROM: edgeagent is not installed in it"
        if [ -L "$venv" ] && [ "$(readlink "$venv")" = "$VENV_FROM" ]; then
            ok "$venv -> $VENV_FROM"
        else
            [ -e "$venv" ] || [ -L "$venv" ] && run rm -rf "$venv"
            run ln -s "$VENV_FROM" "$venv"
        fi
        record link - "$VENV"
        return 0
    fi
    local py extra stamp want
    py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    extra="$(runtime_extra "$py")"
    say_runtime "$py" "$extra"
    # the bus sources of the board configs (docs/sensors.md): pure-Python wheels, ~2 MB
    extra="${extra:+$extra,}serial,modbus"
    # What the venv should hold: python, runtime, and the exact agent sources (or wheel).
    if [ -n "$WHEEL" ]; then
        want="python=$py runtime=$extra wheel=$(sha256sum <"$WHEEL" | cut -c1-16)"
    else
        want="python=$py runtime=$extra src=$(cd "$SRC" && find edgeagent pyproject.toml -type f \
            \( -name '*.py' -o -name '*.toml' -o -name '*.typed' -o -name '*.tflite' \) -print0 \
            | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
    fi
    stamp="$venv/.edgeagent-stamp"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        ok "$venv ($want)"
        record venv - "$VENV"
        return 0
    fi
    [ -L "$venv" ] && run rm -f "$venv"
    [ -x "$venv/bin/python" ] || run "$PYTHON" -m venv "$venv"
    local pkg wheeldir
    if [ -n "$WHEEL" ]; then
        pkg="$WHEEL"
    else
        wheeldir="$(mktemp -d)"
        # Build the agent (pure Python) as a wheel so every dependency can be binary-only:
        # nothing compiles on the board. From a copy: setuptools litters the tree with build/.
        run cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/edgeagent" "$wheeldir/"
        run "$venv/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$wheeldir" "$wheeldir"
        pkg="$wheeldir/edgeagent-*.whl"
        [ "$DRY_RUN" = 1 ] || pkg="$(ls "$wheeldir"/edgeagent-*.whl)"
    fi
    run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: \
        "$pkg${extra:+[$extra]}"
    # Same version number, new code (a re-run after `git pull`): pip would keep the old one.
    run "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$pkg"
    if [ "$DRY_RUN" = 1 ]; then
        printf '    [dry-run] write %s: %s\n' "$stamp" "$want"
    else
        printf '%s\n' "$want" >"$stamp"
    fi
    [ -n "${wheeldir:-}" ] && rm -rf "$wheeldir"
    record venv - "$VENV"
}

step_config() {
    local board="$1" src explicit=0 preset tmp g
    g="$(agent_group)"
    if [ -n "$CONFIG_SRC" ]; then
        src="$CONFIG_SRC" explicit=1
        [ -f "$src" ] || die "--config $src: no such file"
    else
        src="$SRC/configs/$board.toml"
        [ -f "$src" ] || die "no config for board $board ($src); pass --config"
    fi
    ensure_config "$src" "$ETC/config.toml" 0640 root "$g" "$explicit"
    local k keys=""
    for k in "${TRUSTED_KEYS[@]+"${TRUSTED_KEYS[@]}"}"; do
        # Root's copy (the agent's config names the same path): only root can change what it trusts.
        ensure_file "${k#*=}" "$ETC/keys/${k%%=*}.pem" 0644 root root
        keys="${keys:+$keys, }\"${k%%=*}\" = \"$ETC/keys/${k%%=*}.pem\""
    done
    if [ -f "$(P "$ETC/installer.toml")" ]; then
        # Never rewritten: it is root's policy. The manifest keeps the checksum we wrote, if ours.
        ok "$(P "$ETC/installer.toml") (kept)"
        grep -q '^[[:space:]]*trusted_keys[[:space:]]*=' "$(P "$ETC/installer.toml")" 2>/dev/null \
            || echo "    warning: $(P "$ETC/installer.toml") has no trusted_keys: the root helper refuses every firmware install"
        return 0
    fi
    preset="${PRESET:-$(detect_preset)}"
    tmp="$(mktemp)"
    {
        echo "# Root-owned: the privileged installer (edgeagent-installer.service) runs ONLY commands named"
        echo "# here, never one from the agent's request. See /opt/edgeagent/docs/install.md."
        echo "preset = \"$preset\"   # rauc | swupdate | mender | script"
        echo "timeout_s = 1800"
        echo "# Firmware is installed only if its signed manifest verifies with one of these keys (root-owned"
        echo "# files in root-owned directories; a key file others could write stops the helper). Without"
        echo "# trusted_keys every install is refused."
        if [ -n "$keys" ]; then
            echo "trusted_keys = { $keys }"
        else
            echo "# trusted_keys = { \"ops-2026\" = \"$ETC/keys/ops-2026.pem\" }"
        fi
        [ "$preset" = script ] && echo "# script = \"/usr/local/libexec/edgeagent-firmware\"   # called as: script <op> [artifact]"
        echo "# [commands]   # per-op overrides, argv lists; {artifact} is replaced inside one argument"
        echo "# install = [\"/usr/bin/rauc\", \"install\", \"{artifact}\"]"
    } >"$tmp"
    ensure_file "$tmp" "$ETC/installer.toml" 0600 root root conf
    rm -f "$tmp"
}

step_units() {
    local board="$1" u tmp
    for u in "${UNITS[@]}"; do
        ensure_file "$SRC/systemd/$u" "$UNITDIR/$u" 0644 root root
    done
    if [ "$board" = raspberry-pi ]; then
        ensure_dir "$UNITDIR/edgeagent.service.d" 0755 root root
        ensure_file "$SRC/systemd/edgeagent.service.d/raspberry-pi.conf" \
            "$UNITDIR/edgeagent.service.d/raspberry-pi.conf" 0644 root root
    fi
    if [ "$SVC_USER" != edgeagent ]; then
        tmp="$(mktemp)"
        printf '# Written by scripts/install.sh --user %s\n[Service]\nUser=%s\nGroup=%s\n' \
            "$SVC_USER" "$SVC_USER" "$SVC_USER" >"$tmp"
        ensure_dir "$UNITDIR/edgeagent.service.d" 0755 root root
        ensure_file "$tmp" "$UNITDIR/edgeagent.service.d/user.conf" 0644 root root
        rm -f "$tmp"
    fi
    if [ -f "$SRC/docs/install.md" ]; then
        ensure_file "$SRC/docs/install.md" "$OPT/docs/install.md" 0644 root root
    fi
}

step_systemd() {
    if [ "$SYSTEMD" = 0 ]; then
        ok "systemctl steps skipped ($([ -n "$PREFIX" ] && echo "--prefix $PREFIX" || echo "systemd is not PID 1"))"
        return 0
    fi
    [ "$CHANGED_UNITS" = 1 ] && run systemctl daemon-reload
    if systemctl is-enabled --quiet edgeagent.service && systemctl is-enabled --quiet edgeagent-installer.path; then
        ok "units enabled"
    else
        run systemctl enable --now edgeagent-installer.path edgeagent.service
    fi
    [ "$CHANGED_UNITS" = 1 ] && run systemctl try-restart edgeagent.service
    return 0
}

write_manifest() {
    local tmp; tmp="$(mktemp)"
    record file - "$MANIFEST"
    printf '%s\n' "${RECORDS[@]}" >"$tmp"
    local target; target="$(P "$MANIFEST")"
    if [ -f "$target" ] && cmp -s "$tmp" "$target"; then
        ok "$target"
    else
        run install -m 0644 "$tmp" "$target"
    fi
    rm -f "$tmp"
}

do_install() {
    [ "$IS_ROOT" = 1 ] || [ -n "$PREFIX" ] || [ "$DRY_RUN" = 1 ] || die "installing to / needs root"
    local board
    board="${BOARD:-$(detect_board)}"
    case "$board" in raspberry-pi|jetson|default) ;; *) die "--board must be raspberry-pi, jetson or default" ;; esac
    say "checking the board ($board)"
    check_board
    load_manifest
    say "user $SVC_USER"; step_user
    say "directories"; step_dirs
    say "venv $(P "$VENV")"; step_venv
    say "config $(P "$ETC")"; step_config "$board"
    say "systemd units"; step_units "$board"
    say "manifest"; write_manifest
    say "services"; step_systemd
    if [ "$DRY_RUN" = 1 ]; then
        echo; echo "dry run: nothing was changed"; return 0
    fi
    if [ -n "$PREFIX" ]; then
        # Only paths below the prefix: the target's own paths mean nothing on this machine.
        cat <<EOF

edgeagent is installed below $PREFIX (board: $board); nothing outside it was changed.
Edit $(P "$ETC")/config.toml (device.id, mqtt.host, TLS files in $(P "$ETC")/tls/).
On the target system: create the system user $SVC_USER, then enable edgeagent.service and
edgeagent-installer.path (systemctl enable --now), and run \`edgeagent check\` there.
EOF
        return 0
    fi
    cat <<EOF

edgeagent is installed${PREFIX:+ below $PREFIX} (board: $board). Check it with:
    systemctl status edgeagent.service edgeagent-installer.path
    journalctl -u edgeagent -f
    sudo $VENV/bin/edgeagent status
Edit $ETC/config.toml (device.id, mqtt.host, TLS files in $ETC/tls/), then:
    systemctl restart edgeagent.service
EOF
}

# ---------------------------------------------------------------- uninstall
do_uninstall() {
    [ "$IS_ROOT" = 1 ] || [ -n "$PREFIX" ] || [ "$DRY_RUN" = 1 ] || die "uninstalling from / needs root"
    local f; f="$(P "$MANIFEST")"
    [ -f "$f" ] || die "no $f: nothing installed here (or installed by something else)"
    load_manifest
    if [ "$SYSTEMD" = 1 ]; then
        say "stopping services"
        run systemctl disable --now edgeagent.service edgeagent-installer.path || true
        run systemctl stop edgeagent-installer.service || true
    fi
    say "removing files"
    local i kind sum path target users=()
    for (( i=${#RECORDS[@]}-1; i>=0; i-- )); do
        read -r kind sum path <<<"${RECORDS[$i]}"
        target="$(P "$path")"
        case "$kind" in
            file|link)
                if [ -e "$target" ] || [ -L "$target" ]; then run rm -f "$target"; fi ;;
            conf)
                [ -f "$target" ] || continue
                if [ "$PURGE" = 1 ] || [ "$(sha256sum <"$target" | cut -d' ' -f1)" = "$sum" ]; then
                    run rm -f "$target"
                else
                    ok "kept $target (edited; --purge removes it)"
                fi ;;
            venv)
                if [ -L "$target" ]; then run rm -f "$target"; elif [ -d "$target" ]; then run rm -rf "$target"; fi ;;
            state)
                if [ "$PURGE" = 1 ] && [ -d "$target" ]; then run rm -rf "$target"; fi ;;
            dir)
                [ -d "$target" ] || continue
                if [ "$PURGE" = 1 ] && [ "$path" = "$LOGS" ]; then run rm -rf "$target"; continue; fi
                if [ -z "$(ls -A "$target")" ] || [ "$DRY_RUN" = 1 ]; then run rmdir "$target" || true
                else ok "kept $target (not empty)"; fi ;;
            user) users+=("$path") ;;
        esac
    done
    for u in "${users[@]+"${users[@]}"}"; do
        if [ -n "$PREFIX" ]; then
            ok "kept user $u (--prefix: users are the target system's)"
        elif [ "$PURGE" = 1 ]; then
            getent passwd "$u" >/dev/null && run userdel "$u"
            getent group "$u" >/dev/null && run groupdel "$u"
        else
            ok "kept user $u (owns the state dir; --purge removes it)"
        fi
    done
    [ "$SYSTEMD" = 1 ] && run systemctl daemon-reload
    say "uninstalled${PREFIX:+ from $PREFIX}$([ "$PURGE" = 1 ] || echo "; kept $(P "$STATE")")"
}

if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
