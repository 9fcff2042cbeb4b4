#!/usr/bin/env bash
# Install or upgrade authapp on Debian 12, as root, from the checkout that holds this file:
#
#   apt-get install -y git && git clone <repository> /srv/authapp
#   AUTHAPP_MAIL_URL=... AUTHAPP_MAIL_FROM=... AUTHAPP_FRONTEND_URL=... \
#       /srv/authapp/deploy/install.sh                      # first install (docs/deployment.md)
#   git -C /srv/authapp pull --ff-only && /srv/authapp/deploy/install.sh   # each upgrade
#
# Every step is idempotent: a re-run keeps the settings, secrets, database and certificate
# it finds, installs what changed, migrates, then restarts the three instances one at a
# time, each once the previous one answers. docs/deployment.md explains each step.
#
# Knobs (environment variables; the defaults are a production install):
#   AUTHAPP_DOMAIN=auth.example.com   nginx's server_name and the certificate's name
#   AUTHAPP_CERT=self-signed          or certbot: Let's Encrypt through the webroot
#   AUTHAPP_CERTBOT_EMAIL=            certbot's account address (AUTHAPP_CERT=certbot)
#   AUTHAPP_LOCAL_POSTGRES=yes        install PostgreSQL here and make the role and database
#   AUTHAPP_LOCAL_REDIS=yes           install Redis here (the shared rate-limit counters)
#   AUTHAPP_DATABASE_URL=             with AUTHAPP_LOCAL_POSTGRES=no: the database to use
#   AUTHAPP_REDIS_URL=redis://127.0.0.1:6379/0
#   AUTHAPP_MAIL_URL= AUTHAPP_MAIL_FROM= AUTHAPP_FRONTEND_URL=
#                                     the mail settings production needs: required for a
#                                     new settings file (or give them in AUTHAPP_SETTINGS);
#                                     checked before anything is installed
#   AUTHAPP_SETTINGS=                 more KEY=value settings (space separated) for a new
#                                     settings file, e.g. "CORS_ORIGINS=https://app.example.com"
# and, for tests and sandboxes (tests/e2e/test_install.py runs this very script so):
#   AUTHAPP_PREFIX=                   every path below (/etc, /srv, /var, /run) lives under it
#   AUTHAPP_SYSTEMD=yes               no: no systemctl; the script starts nginx and the
#                                     instances itself, as the units would, and checks the
#                                     units with `systemd-analyze verify`
#   AUTHAPP_APT=yes                   no: the packages must be installed already
#   AUTHAPP_USER=authapp              the system user (and group) of the instances
#   AUTHAPP_NGINX_USER=www-data       nginx's worker user, joins that group
#   AUTHAPP_DB_NAME=authapp AUTHAPP_DB_USER=authapp AUTHAPP_PG_HOST=127.0.0.1 AUTHAPP_PG_PORT=5432
#   AUTHAPP_PG_ADMIN_URL=             a superuser's URL for psql (default: the postgres user
#                                     over the local socket)
#   AUTHAPP_LISTEN_ADDR=              empty: every address, IPv4 and IPv6
#   AUTHAPP_HTTP_PORT=80 AUTHAPP_HTTPS_PORT=443 AUTHAPP_METRICS_PORT=9180
#   AUTHAPP_WAIT_SECONDS=120          how long an instance may take to answer
set -euo pipefail
umask 022
APP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PREFIX="${AUTHAPP_PREFIX:-}"
SYSTEMD="${AUTHAPP_SYSTEMD:-yes}"
APT="${AUTHAPP_APT:-yes}"
DOMAIN="${AUTHAPP_DOMAIN:-auth.example.com}"
CERT_MODE="${AUTHAPP_CERT:-self-signed}"
CERTBOT_EMAIL="${AUTHAPP_CERTBOT_EMAIL:-}"
LOCAL_POSTGRES="${AUTHAPP_LOCAL_POSTGRES:-yes}"
LOCAL_REDIS="${AUTHAPP_LOCAL_REDIS:-yes}"
REDIS_URL="${AUTHAPP_REDIS_URL:-redis://127.0.0.1:6379/0}"
SERVICE_USER="${AUTHAPP_USER:-authapp}"
NGINX_USER="${AUTHAPP_NGINX_USER:-www-data}"
DB_NAME="${AUTHAPP_DB_NAME:-authapp}"
DB_USER="${AUTHAPP_DB_USER:-authapp}"
PG_HOST="${AUTHAPP_PG_HOST:-127.0.0.1}"
PG_PORT="${AUTHAPP_PG_PORT:-5432}"
PG_ADMIN_URL="${AUTHAPP_PG_ADMIN_URL:-}"
LISTEN_ADDR="${AUTHAPP_LISTEN_ADDR:-}"
HTTP_PORT="${AUTHAPP_HTTP_PORT:-80}"
HTTPS_PORT="${AUTHAPP_HTTPS_PORT:-443}"
METRICS_PORT="${AUTHAPP_METRICS_PORT:-9180}"
WAIT_SECONDS="${AUTHAPP_WAIT_SECONDS:-120}"
INSTANCES=(1 2 3)   # nginx.conf's upstream has three

ETC_DIR="$PREFIX/etc/authapp"
ENV_FILE="$ETC_DIR/authapp.env"
TLS_DIR="$ETC_DIR/tls"
LOG_DIR="$PREFIX/var/log/authapp"
RUN_DIR="$PREFIX/run/authapp"
WEBROOT="$PREFIX/var/www/letsencrypt"
UNIT_DIR="$PREFIX/etc/systemd/system"
NGINX_DIR="$PREFIX/etc/nginx"
NGINX_SITE="$NGINX_DIR/conf.d/authapp.conf"
LETSENCRYPT="$PREFIX/etc/letsencrypt"
VENV="$APP_DIR/.venv"
# Only the no-systemd mode uses these: nginx's own main file and the instances' pid files.
NGINX_MAIN="$NGINX_DIR/nginx.conf"
SUPERVISE_DIR="$PREFIX/run/authapp-install"
# What a new settings file must be given (AUTHAPP_<name>, or in AUTHAPP_SETTINGS): a
# production start refuses to run without them (docs/email.md).
NEW_FILE_NEEDS=(MAIL_URL MAIL_FROM FRONTEND_URL)

step() { printf '\n==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# -- 0. The knobs, checked before anything is installed ---------------------------------

check_knobs() {
    [ "$(id -u)" -eq 0 ] || die "run as root"
    case "$SYSTEMD" in yes|no) ;; *) die "AUTHAPP_SYSTEMD must be yes or no" ;; esac
    case "$CERT_MODE" in self-signed|certbot) ;; *) die "AUTHAPP_CERT must be self-signed or certbot" ;; esac
    if [ "$CERT_MODE" = certbot ] && [ -z "$CERTBOT_EMAIL" ]; then
        die "AUTHAPP_CERT=certbot needs AUTHAPP_CERTBOT_EMAIL"
    fi
    check_new_settings
}

check_new_settings() {   # a first install: what the settings file needs, in its format
    [ ! -e "$ENV_FILE" ] || return 0   # a re-run keeps the file; the knobs are not read
    local extra=() missing=() knob given
    read -r -a extra <<<"${AUTHAPP_SETTINGS:-}"
    for knob in "${NEW_FILE_NEEDS[@]}"; do
        given="AUTHAPP_$knob"
        [ -n "${!given:-}" ] || [[ " ${extra[*]} " == *" $knob="* ]] || missing+=("$given")
    done
    [ "$LOCAL_POSTGRES" = yes ] || [ -n "${AUTHAPP_DATABASE_URL:-}" ] || missing+=(AUTHAPP_DATABASE_URL)
    if [ "${#missing[@]}" -gt 0 ]; then
        die "a new settings file needs ${missing[*]}: give them as docs/deployment.md's \"First install\" does (docs/email.md says what to put there)"
    fi
    new_settings >/dev/null   # a value the file cannot hold stops here, named
}

# -- 1. Packages ------------------------------------------------------------------------

install_packages() {
    step "packages"
    local packages=(nginx git curl sudo openssl ca-certificates python3 python3-venv
                    python3-dev build-essential logrotate)
    [ "$LOCAL_POSTGRES" = yes ] && packages+=(postgresql postgresql-client)
    [ "$LOCAL_REDIS" = yes ] && packages+=(redis-server)
    [ "$CERT_MODE" = certbot ] && packages+=(certbot)
    if [ "$APT" = yes ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
    fi
    local command
    for command in nginx git curl openssl python3 cc; do
        command -v "$command" >/dev/null || [ -x "/usr/sbin/$command" ] || die "$command is missing (apt-get install ${packages[*]})"
    done
}

# -- 2. The system user -----------------------------------------------------------------

create_user() {
    step "system user $SERVICE_USER"
    if ! getent group "$SERVICE_USER" >/dev/null; then
        addgroup --system --quiet "$SERVICE_USER"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        adduser --system --quiet --ingroup "$SERVICE_USER" --home /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    # nginx opens the instances' sockets (mode 0660, group $SERVICE_USER).
    if ! id -nG "$NGINX_USER" | tr ' ' '\n' | grep -qx "$SERVICE_USER"; then
        usermod -aG "$SERVICE_USER" "$NGINX_USER"
    fi
}

# -- 3. The code's virtualenv -----------------------------------------------------------

install_venv() {
    step "virtualenv $VENV (builds uWSGI on first run)"
    # Debian's Python (python3-venv), whatever else PATH holds.
    [ -x "$VENV/bin/python" ] || /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$APP_DIR/requirements-deploy.txt"
}

# -- 4. PostgreSQL: the role (with a password: Debian's TCP login asks for one) and database

psql_admin() {
    if [ -n "$PG_ADMIN_URL" ]; then
        psql "$PG_ADMIN_URL" -X -q -v ON_ERROR_STOP=1 "$@"
    else
        runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 "$@"
    fi
}

start_service() {   # a Debian service this one needs (systemd mode only)
    [ "$SYSTEMD" = yes ] && systemctl enable --now "$1"
    return 0
}

database_url_part() {   # one part of the settings file's DATABASE_URL: user, password, host, database
    env_value DATABASE_URL | /usr/bin/python3 -c '
import sys, urllib.parse as p
url = p.urlsplit(sys.stdin.read().strip())
print(p.unquote({"user": url.username, "password": url.password, "host": url.hostname,
                 "database": url.path.lstrip("/")}[sys.argv[1]] or ""))' "$1"
}

setup_postgres() {
    [ "$LOCAL_POSTGRES" = yes ] || return 0
    # The settings file is the truth once written: its DATABASE_URL names the role, its
    # password and the database (docs/operations.md restores a backup by changing it).
    local role password database
    role="$(database_url_part user)" password="$(database_url_part password)"
    database="$(database_url_part database)"
    [ -n "$role" ] && [ -n "$password" ] && [ -n "$database" ] \
        || die "DATABASE_URL in $ENV_FILE needs a user, a password and a database"
    step "PostgreSQL role $role and database $database"
    start_service postgresql
    psql_admin -v role="$role" -v password="$password" -v db="$database" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I LOGIN PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', :'db', :'role', 'UTF8')
    WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
}

setup_redis() {
    [ "$LOCAL_REDIS" = yes ] || return 0
    step "Redis"
    start_service redis-server
}

# -- 5. The settings file: one format that systemd and sh read alike --------------------

# systemd's EnvironmentFile= and sh's `set -a; . file` quote and expand differently, so the
# file is held to the two forms both read the same way (docs/deployment.md): KEY=value, the
# value of letters, digits and _ @ : / . , + % = ? ! * - only; or KEY="value", the value
# without ", $, ` or \ (which are the only characters either reader treats specially
# inside double quotes) and without control characters. A sender's display name needs the
# second form (MAIL_FROM="Example <no-reply@example.com>"). A password with other
# characters goes into DATABASE_URL percent-encoded (%24 for $), which a URL needs anyway.
BARE_VALUE='[A-Za-z0-9_@:/.,+%=?!*-]*'
QUOTED_VALUE='"[^"$`\[:cntrl:]]*"'
SETTING_LINE="^[A-Z][A-Z0-9_]*=($BARE_VALUE|$QUOTED_VALUE)\$"

check_env_file() {
    local number=0 line
    while IFS= read -r line || [ -n "$line" ]; do
        number=$((number + 1))
        case "$line" in ''|'#'*) continue ;; esac
        [[ "$line" =~ $SETTING_LINE ]] || die "$ENV_FILE line $number: write KEY=value (letters, digits and _ @ : / . , + % = ? ! * -) or KEY=\"value\" (no \", \$, \` or \\ inside; percent-encode such characters in a URL)"
    done <"$ENV_FILE"
}

setting_line() {   # KEY=value: the settings file's line for it, quoted if the value needs it
    local key="${1%%=*}" value="${1#*=}"
    # (never the value in a message: it may be a secret)
    [[ "$key" =~ ^[A-Z][A-Z0-9_]*$ ]] && [ "$key" != "$1" ] || die "AUTHAPP_SETTINGS: each setting is KEY=value, KEY of capitals, digits and _"
    if [[ "$value" =~ ^$BARE_VALUE$ ]]; then
        printf '%s=%s\n' "$key" "$value"
    elif [[ "\"$value\"" =~ ^$QUOTED_VALUE$ ]]; then
        printf '%s="%s"\n' "$key" "$value"
    else
        die "$key: the settings file cannot hold a value with \", \$, \`, \\ or a control character (percent-encode them in a URL)"
    fi
}

env_value() {   # the value of one key of the settings file (the last one wins, as in sh)
    sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1 | sed 's/^"\(.*\)"$/\1/'
}

# Like Python's secrets.token_urlsafe(N), from coreutils only: it runs before the packages.
random_secret() { head -c "$1" /dev/urandom | base64 -w 0 | tr '+/' '-_' | tr -d '='; }

new_settings() {   # a new settings file: the knobs' settings and new secrets
    local database_url="${AUTHAPP_DATABASE_URL:-}" extra=() setting knob given jwt_secret db_password
    # Each secret in an assignment of its own: set -e sees a failed substitution there,
    # never inside `local` or an array (they would hide it and write an empty secret).
    jwt_secret="$(random_secret 48)"
    db_password="$(random_secret 24)"
    [ "${#jwt_secret}" -ge 64 ] && [ "${#db_password}" -ge 32 ] || die "could not read random bytes from /dev/urandom"
    if [ "$LOCAL_POSTGRES" = yes ]; then
        database_url="postgresql://$DB_USER:$db_password@$PG_HOST:$PG_PORT/$DB_NAME"
    fi
    read -r -a extra <<<"${AUTHAPP_SETTINGS:-}"
    local settings=("ENVIRONMENT=production" "DATABASE_URL=$database_url"
                    "JWT_SECRET_KEY=$jwt_secret" "BCRYPT_ROUNDS=12" "LOG_LEVEL=INFO"
                    "RATELIMIT_STORAGE_URI=$REDIS_URL")
    for knob in "${NEW_FILE_NEEDS[@]}"; do
        given="AUTHAPP_$knob"
        [ -z "${!given:-}" ] || settings+=("$knob=${!given}")
    done
    echo "# authapp's settings (docs/configuration.md), read by the units' EnvironmentFile="
    echo "# and by deploy/install.sh. Format: KEY=value (letters, digits and _ @ : / . , + % = ? ! * -)"
    echo "# or KEY=\"value\" (no \", \$, \` or \\ inside); docs/deployment.md."
    for setting in "${settings[@]}"; do
        # a setting of AUTHAPP_SETTINGS replaces the default of the same name
        [[ " ${extra[*]} " == *" ${setting%%=*}="* ]] || setting_line "$setting"
    done
    for setting in "${extra[@]}"; do setting_line "$setting"; done
}

write_env_file() {
    step "settings $ENV_FILE"
    install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC_DIR"
    if [ ! -e "$ENV_FILE" ]; then
        # (check_new_settings has made one already: nothing in it can stop here)
        (umask 077 && new_settings >"$ENV_FILE.new")
        chown root:"$SERVICE_USER" "$ENV_FILE.new"
        chmod 0640 "$ENV_FILE.new"
        mv "$ENV_FILE.new" "$ENV_FILE"
        echo "wrote $ENV_FILE (new secrets); later runs keep it as it is"
    else
        chown root:"$SERVICE_USER" "$ENV_FILE"
        chmod 0640 "$ENV_FILE"
    fi
    check_env_file
}

# -- 6. Directories and the certificate -------------------------------------------------

make_directories() {
    step "directories"
    install -d -m 0755 "$LOG_DIR" "$WEBROOT" "$PREFIX/run"
    install -d -m 0750 -o root -g root "$TLS_DIR"
}

certificate_paths() {   # the certificate nginx serves: Let's Encrypt's once it exists
    if [ -s "$LETSENCRYPT/live/$DOMAIN/fullchain.pem" ]; then
        CERT_FILE="$LETSENCRYPT/live/$DOMAIN/fullchain.pem"
        KEY_FILE="$LETSENCRYPT/live/$DOMAIN/privkey.pem"
    else
        CERT_FILE="$TLS_DIR/fullchain.pem"
        KEY_FILE="$TLS_DIR/privkey.pem"
    fi
}

self_signed_certificate() {
    # nginx cannot load its HTTPS server without a certificate, so there is always one: a
    # self-signed one (renewed here when it has less than 30 days left) until certbot's.
    if [ -s "$TLS_DIR/fullchain.pem" ] && openssl x509 -checkend 2592000 -noout -in "$TLS_DIR/fullchain.pem" >/dev/null; then
        return 0
    fi
    step "self-signed certificate for $DOMAIN"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
        -subj "/CN=$DOMAIN" -addext "subjectAltName=DNS:$DOMAIN" \
        -keyout "$TLS_DIR/privkey.pem.new" -out "$TLS_DIR/fullchain.pem.new" 2>/dev/null
    chmod 0600 "$TLS_DIR/privkey.pem.new"
    mv "$TLS_DIR/privkey.pem.new" "$TLS_DIR/privkey.pem"
    mv "$TLS_DIR/fullchain.pem.new" "$TLS_DIR/fullchain.pem"
}

certbot_certificate() {
    [ "$CERT_MODE" = certbot ] || return 0
    step "Let's Encrypt certificate for $DOMAIN (webroot $WEBROOT)"
    # Renewals run from certbot's timer; this hook makes nginx load each new certificate.
    install -d -m 0755 "$LETSENCRYPT/renewal-hooks/deploy"
    printf '#!/bin/sh\n# Installed by authapp deploy/install.sh: load a renewed certificate.\nnginx -t -q && systemctl reload nginx\n' \
        >"$LETSENCRYPT/renewal-hooks/deploy/authapp-reload-nginx"
    chmod 0755 "$LETSENCRYPT/renewal-hooks/deploy/authapp-reload-nginx"
    if [ ! -s "$LETSENCRYPT/live/$DOMAIN/fullchain.pem" ]; then
        # nginx serves /.well-known/acme-challenge/ from the webroot on port 80 already.
        certbot certonly --config-dir "$LETSENCRYPT" --webroot -w "$WEBROOT" -d "$DOMAIN" \
            --email "$CERTBOT_EMAIL" --agree-tos --non-interactive
        certificate_paths
        install_nginx_site
        reload_nginx
    fi
}

# -- 7. The units, logrotate, nginx's site ----------------------------------------------

render() {   # a file of the checkout with its production paths moved to this install's
    sed -e "s|/srv/authapp|$APP_DIR|g" \
        -e "s|/etc/authapp/authapp.env|$ENV_FILE|g" \
        -e "s|/run/authapp/|$RUN_DIR/|g" \
        -e "s|/var/log/authapp/|$LOG_DIR/|g" \
        -e "s|/var/www/letsencrypt|$WEBROOT|g" \
        -e "s|^User=authapp$|User=$SERVICE_USER|" \
        -e "s|^Group=authapp$|Group=$SERVICE_USER|" \
        "$APP_DIR/$1"
}

install_units() {
    step "systemd units, logrotate"
    install -d -m 0755 "$UNIT_DIR" "$UNIT_DIR/authapp@.service.d" "$UNIT_DIR/authapp-courier.service.d" \
        "$PREFIX/etc/logrotate.d"
    local unit
    for unit in authapp@.service authapp-courier.service authapp-prune.service authapp-prune.timer; do
        render "deploy/$unit" >"$UNIT_DIR/$unit.new"
        mv "$UNIT_DIR/$unit.new" "$UNIT_DIR/$unit"
    done
    # The instances and the courier start after the local database and Redis, and pull them in.
    local wants=() dropin
    [ "$LOCAL_POSTGRES" = yes ] && wants+=(postgresql.service)
    [ "$LOCAL_REDIS" = yes ] && wants+=(redis-server.service)
    for dropin in authapp@.service.d authapp-courier.service.d; do
        {
            echo "# Installed by deploy/install.sh: the services this machine runs for authapp."
            echo "[Unit]"
            if [ "${#wants[@]}" -gt 0 ]; then
                echo "Wants=${wants[*]}"
                echo "After=${wants[*]}"
            fi
        } >"$UNIT_DIR/$dropin/local.conf"
    done
    render deploy/logrotate-authapp >"$PREFIX/etc/logrotate.d/authapp"
    if [ "$SYSTEMD" = yes ]; then
        systemctl daemon-reload
    elif command -v systemd-analyze >/dev/null; then
        verify_units
    fi
}

verify_units() {   # no-systemd mode: what systemd would refuse, found without it
    local dir unit
    dir="$(mktemp -d)"
    for unit in authapp@.service authapp-courier.service authapp-prune.service authapp-prune.timer; do
        cp "$UNIT_DIR/$unit" "$dir/${unit/@./@1.}"
    done
    cp -r "$UNIT_DIR/authapp@.service.d" "$dir/authapp@1.service.d"
    cp -r "$UNIT_DIR/authapp-courier.service.d" "$dir/"
    local output
    if ! output="$(cd "$dir" && SYSTEMD_UNIT_PATH="$dir:" systemd-analyze verify "$dir"/authapp@1.service "$dir"/authapp-courier.service "$dir"/authapp-prune.service "$dir"/authapp-prune.timer 2>&1)" \
        || [ -n "$output" ]; then
        rm -rf "$dir"
        die "systemd-analyze verify: $output"
    fi
    rm -rf "$dir"
    echo "systemd-analyze verify: the units are valid"
}

install_nginx_site() {
    step "nginx site $NGINX_SITE"
    install -d -m 0755 "$NGINX_DIR/conf.d"
    local listen_http="$HTTP_PORT" listen_https="$HTTPS_PORT" ipv6=yes
    if [ -n "$LISTEN_ADDR" ]; then
        listen_http="$LISTEN_ADDR:$HTTP_PORT" listen_https="$LISTEN_ADDR:$HTTPS_PORT" ipv6=no
    fi
    render nginx.conf \
        | sed -e "s|server_name auth.example.com;|server_name $DOMAIN;|" \
              -e "s|/etc/letsencrypt/live/auth.example.com/fullchain.pem|$CERT_FILE|" \
              -e "s|/etc/letsencrypt/live/auth.example.com/privkey.pem|$KEY_FILE|" \
              -e "s|listen 80;|listen $listen_http;|" \
              -e "s|listen \[::\]:80;|listen [::]:$HTTP_PORT;|" \
              -e "s|listen 443 ssl http2;|listen $listen_https ssl http2;|" \
              -e "s|listen \[::\]:443 ssl http2;|listen [::]:$HTTPS_PORT ssl http2;|" \
              -e "s|listen 127.0.0.1:9180;|listen 127.0.0.1:$METRICS_PORT;|" \
              -e "s|/metrics/1, /2, /3|/metrics/1, /2, /3 (port $METRICS_PORT)|" \
        | if [ "$ipv6" = no ]; then grep -v 'listen \[::\]'; else cat; fi \
        >"$NGINX_SITE.new"
    mv "$NGINX_SITE.new" "$NGINX_SITE"
}

write_nginx_main() {   # no-systemd mode: Debian's nginx.conf, reduced, under the prefix
    install -d -m 0755 "$NGINX_DIR/temp"
    cp /etc/nginx/uwsgi_params "$NGINX_DIR/uwsgi_params"
    cat >"$NGINX_MAIN" <<EOF
# Written by deploy/install.sh (AUTHAPP_SYSTEMD=no): Debian's /etc/nginx/nginx.conf, reduced.
user $NGINX_USER;
worker_processes 1;
pid $PREFIX/run/nginx.pid;
error_log $LOG_DIR/nginx-main-error.log warn;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    client_body_temp_path $NGINX_DIR/temp/body;
    proxy_temp_path $NGINX_DIR/temp/proxy;
    fastcgi_temp_path $NGINX_DIR/temp/fastcgi;
    uwsgi_temp_path $NGINX_DIR/temp/uwsgi;
    scgi_temp_path $NGINX_DIR/temp/scgi;
    access_log off;
    include $NGINX_DIR/conf.d/*.conf;
}
EOF
}

nginx_command() { nginx -p "$NGINX_DIR/" -e "$LOG_DIR/nginx-main-error.log" -c "$NGINX_MAIN" "$@"; }

reload_nginx() {
    step "nginx: check and load the site"
    if [ "$SYSTEMD" = yes ]; then
        nginx -t -q
        systemctl enable --now nginx
        systemctl reload nginx
        return 0
    fi
    write_nginx_main
    nginx_command -t -q
    if [ -s "$PREFIX/run/nginx.pid" ] && kill -0 "$(cat "$PREFIX/run/nginx.pid")" 2>/dev/null; then
        nginx_command -s reload
    else
        nginx_command
    fi
    # Until nginx listens on the metrics port, no instance can be seen answering.
    wait_for "nginx on 127.0.0.1:$METRICS_PORT" curl -s -o /dev/null "http://127.0.0.1:$METRICS_PORT/"
}

wait_for() {   # wait_for WHAT COMMAND...: until the command succeeds, at most WAIT_SECONDS
    local what="$1" deadline=$((SECONDS + WAIT_SECONDS))
    shift
    until "$@"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "install.sh: gave up waiting for $what after ${WAIT_SECONDS}s" >&2
            return 1
        fi
        sleep 0.5
    done
}

# -- 8. Migrate, then restart the instances one at a time -------------------------------

as_service() {   # COMMAND... run as the service user, with the settings file's environment only
    (cd "$APP_DIR" && env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
        setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups \
        sh -c 'set -a; . "$0"; set +a; exec "$@"' "$ENV_FILE" "$@")
}

migrate() {
    step "database migrations (flask db upgrade)"
    as_service "$VENV/bin/flask" --app wsgi db upgrade
}

unit_environment() {   # the Environment= lines of authapp@.service for instance $1
    sed -n "s/^Environment=//p" "$UNIT_DIR/authapp@.service" | sed "s/%i/$1/g"
}

stop_instance() {   # no-systemd mode: ExecStop= of authapp@.service, then KillMode=mixed
    local n="$1" pidfile="$SUPERVISE_DIR/$1.pid" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        rm -f "$RUN_DIR/$n/uwsgi.sock"
        sleep 2
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 40))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    rm -rf "${RUN_DIR:?}/$n"
}

start_instance() {   # no-systemd mode: what systemd does for authapp@N
    local n="$1" variables=()
    stop_instance "$n"
    # RuntimeDirectory=authapp/%i authapp/%i/metrics, owned by the service user
    install -d -m 0755 "$RUN_DIR" "$SUPERVISE_DIR"
    install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$RUN_DIR/$n" "$RUN_DIR/$n/metrics"
    mapfile -t variables < <(unit_environment "$n")
    (cd "$APP_DIR" && exec env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 "${variables[@]}" \
        setsid sh -c 'echo $$ >"$0"; set -a; . "$1"; set +a; shift; exec "$@"' \
        "$SUPERVISE_DIR/$n.pid" "$ENV_FILE" \
        setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups \
        "$VENV/bin/uwsgi" --ini "$APP_DIR/uwsgi.ini" \
        </dev/null >>"$LOG_DIR/uwsgi-$n.log" 2>&1 &)
}

instance_answers() {
    curl -sf -o /dev/null "http://127.0.0.1:$METRICS_PORT/metrics/$1" && return 0
    if [ "$SYSTEMD" = no ] && ! kill -0 "$(cat "$SUPERVISE_DIR/$1.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
        tail -n 20 "$LOG_DIR/uwsgi-$1.log" >&2 || true
        die "instance $1 exited"
    fi
    return 1
}

restart_instances() {
    local n
    for n in "${INSTANCES[@]}"; do
        step "instance $n: restart, then wait until it answers"
        if [ "$SYSTEMD" = yes ]; then
            systemctl enable --quiet "authapp@$n"
            systemctl restart "authapp@$n"
        else
            start_instance "$n"
        fi
        if ! wait_for "instance $n" instance_answers "$n"; then
            if [ "$SYSTEMD" = yes ]; then
                journalctl -u "authapp@$n" -n 20 --no-pager >&2 || true
            else
                tail -n 20 "$LOG_DIR/uwsgi-$n.log" >&2 || true
            fi
            die "instance $n did not answer on http://127.0.0.1:$METRICS_PORT/metrics/$n within ${WAIT_SECONDS}s"
        fi
    done
}

restart_courier() {
    step "mail courier (authapp-courier.service)"
    if [ "$SYSTEMD" = yes ]; then
        systemctl enable --quiet authapp-courier
        systemctl restart authapp-courier
    else
        echo "no systemd: the courier unit is installed and verified, not started (run it as its ExecStart= says)"
    fi
}

enable_timers() {
    step "daily prune of expired sessions (authapp-prune.timer)"
    if [ "$SYSTEMD" = yes ]; then
        systemctl enable --now authapp-prune.timer
    else
        # No timer without systemd: run its service's command once, as the timer would.
        as_service "$VENV/bin/flask" --app wsgi sessions prune
    fi
}

check_https() {
    step "check: https://$DOMAIN/health through nginx"
    local address="${LISTEN_ADDR:-127.0.0.1}"
    curl -sfk --resolve "$DOMAIN:$HTTPS_PORT:$address" "https://$DOMAIN:$HTTPS_PORT/health"
    echo
}

main() {
    cd /   # every path is absolute; psql and the app never start in root's home
    check_knobs
    install_packages
    create_user
    install_venv
    write_env_file
    setup_postgres
    setup_redis
    make_directories
    self_signed_certificate
    certificate_paths
    install_units
    install_nginx_site
    reload_nginx
    certbot_certificate
    migrate
    restart_instances
    restart_courier
    enable_timers
    check_https
    step "done: authapp runs (docs/operations.md: backups, upgrades, monitoring)"
}

# Sourced (`. deploy/install.sh`, as tests/test_deploy_docs.py does), it defines the steps
# and runs none of them.
[ "${BASH_SOURCE[0]}" != "$0" ] || main
