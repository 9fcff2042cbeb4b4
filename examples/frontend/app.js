// authapp example frontend: register, log in, show the user, list and revoke sessions, log out;
// forgot password, reset password, verify email, change email (the pages the email links open).
//
// Where the tokens live: in the two variables below and nowhere else. Not localStorage, not
// sessionStorage, not a cookie, not the URL: any script that runs on this origin can read
// storage, at any time and long after the fact, while a variable dies with the tab. The
// price is that a reload logs the user out; see docs/frontend.md.
(function () {
  "use strict";

  const config = window.AUTHAPP_CONFIG || {};
  const API = String(config.apiBaseUrl || "").replace(/\/+$/, "");

  let accessToken = null;
  let refreshToken = null;
  let refreshing = null; // the refresh in flight, shared by every call that needs it
  let pending = 0;
  let linkToken = null; // the token of an email link's fragment, held like the session's tokens

  class ApiError extends Error {
    constructor(status, body, requestId) {
      const envelope = body && typeof body === "object" ? body : {};
      super(envelope.detail || `The API answered ${status}`);
      this.status = status;
      this.code = envelope.error_code || "";
      this.requestId = envelope.request_id || requestId || "";
      this.fields = envelope.errors || null;
    }
  }

  class NetworkError extends Error {}

  const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

  // -- HTTP -------------------------------------------------------------------------------

  async function request(method, path, { body, auth = false } = {}) {
    const headers = { Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (auth) headers.Authorization = `Bearer ${accessToken}`;
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        mode: "cors",
        credentials: "omit", // the tokens travel in the Authorization header, never in cookies
        cache: "no-store",
      });
    } catch (err) {
      // The browser tells a script nothing more: a refused CORS check, a server that is
      // down and a blocked address all look the same from here.
      throw new NetworkError(
        `Could not reach the API at ${API || "(no apiBaseUrl in config.js)"}. Is it running, and does its ` +
          `CORS_ORIGINS list this page's origin (${window.location.origin})?`,
      );
    }
    if (response.status === 204) return null;
    let data = null;
    try {
      data = await response.json();
    } catch (err) {
      data = null;
    }
    if (!response.ok) throw new ApiError(response.status, data, response.headers.get("X-Request-ID"));
    return data;
  }

  function isExpired(err) {
    return err instanceof ApiError && err.status === 401 && err.code === "TOKEN_EXPIRED";
  }

  function refreshTokens() {
    if (!refreshing) {
      refreshing = request("POST", "/auth/refresh", { body: { refresh_token: refreshToken } })
        .then(
          (pair) => {
            keepTokens(pair);
            notice("Your access token had expired: it was refreshed and the call retried.");
          },
          (err) => {
            // The refresh token is expired, revoked or reused: the session is over.
            if (err instanceof ApiError && err.status === 401) forgetSession();
            throw err;
          },
        )
        .finally(() => {
          refreshing = null;
        });
    }
    return refreshing;
  }

  // A call with the access token. When it answers 401 TOKEN_EXPIRED, refresh the pair once
  // and retry once; any other 401 (revoked, inactive, invalid) means the session is over.
  async function authed(method, path, body) {
    if (!accessToken) throw new ApiError(401, { detail: "You are not logged in", error_code: "MISSING_TOKEN" });
    const sent = accessToken;
    try {
      try {
        return await request(method, path, { body, auth: true });
      } catch (err) {
        if (!isExpired(err) || !refreshToken) throw err;
        // Another call may have refreshed already while this one was on its way.
        if (accessToken === sent) await refreshTokens();
        return await request(method, path, { body, auth: true });
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && !isExpired(err)) forgetSession();
      throw err;
    }
  }

  // -- State ------------------------------------------------------------------------------

  function keepTokens(pair) {
    accessToken = pair.access_token;
    refreshToken = pair.refresh_token;
  }

  function forgetSession() {
    accessToken = null;
    refreshToken = null;
    render(null);
  }

  function setBusy(delta) {
    pending += delta;
    $("main").setAttribute("aria-busy", pending > 0 ? "true" : "false");
  }

  // -- Rendering: text only (textContent), never markup built from data -------------------

  function render(user) {
    $("signed-in").hidden = !user;
    $("signed-out").hidden = Boolean(user);
    if (!user) {
      $("sessions").replaceChildren();
      return;
    }
    $("me-username").textContent = user.username;
    $("me-id").textContent = String(user.id);
    $("me-email").textContent = user.email;
    $("me-email-verified").textContent = user.email_verified ? "yes" : "no";
    $("verify-request").hidden = Boolean(user.email_verified);
    $("me-created-at").textContent = user.created_at;
    $("me-last-login").textContent = user.last_login || "never";
  }

  function renderSessions(sessions) {
    const items = sessions.map((session) => {
      const li = document.createElement("li");
      li.dataset.testid = "session";
      li.dataset.sessionId = session.id;
      li.dataset.current = String(Boolean(session.current));
      const title = document.createElement("div");
      title.textContent = session.user_agent || "unknown browser";
      const meta = document.createElement("div");
      meta.className = "meta";
      meta.textContent =
        `from ${session.ip || "unknown address"} · started ${session.created_at} · ` +
        `last used ${session.last_used_at || "never"} · ends ${session.expires_at}`;
      li.append(title, meta);
      if (session.current) {
        const mark = document.createElement("span");
        mark.className = "current";
        mark.textContent = "this session";
        li.append(mark);
      } else {
        const revoke = document.createElement("button");
        revoke.type = "button";
        revoke.dataset.testid = "revoke-session";
        revoke.textContent = "Revoke";
        revoke.addEventListener("click", () => run(() => revokeSession(session.id)));
        li.append(revoke);
      }
      return li;
    });
    $("sessions").replaceChildren(...items);
  }

  function clearMessages() {
    $("error").hidden = true;
    $("notice").textContent = "";
  }

  function notice(text) {
    $("notice").textContent = text;
  }

  function showError(err) {
    $("error-detail").textContent = err.message;
    $("error-code").textContent = err.code || "";
    $("error-request-id").textContent = err.requestId || "";
    $("error-request-id-line").hidden = !err.requestId;
    const fields = Object.entries(err.fields || {}).map(([field, messages]) => {
      const li = document.createElement("li");
      li.textContent = `${field}: ${[].concat(messages).join(" ")}`;
      return li;
    });
    $("error-fields").replaceChildren(...fields);
    $("error").hidden = false;
  }

  // Every user action: clear the old messages, run, show any failure. <main aria-busy>
  // stays "true" until the action and its rendering are done.
  async function run(action) {
    clearMessages();
    setBusy(+1);
    try {
      await action();
    } catch (err) {
      if (!(err instanceof ApiError || err instanceof NetworkError)) console.error(err);
      showError(err);
    } finally {
      setBusy(-1);
    }
  }

  // -- Actions ----------------------------------------------------------------------------

  async function signIn(pair) {
    keepTokens(pair);
    render(pair.user);
    await loadSessions();
  }

  async function register(form) {
    const data = new FormData(form);
    const pair = await request("POST", "/auth/register", {
      body: { email: data.get("email"), username: data.get("username"), password: data.get("password") },
    });
    form.reset();
    await signIn(pair);
    notice(`Welcome, ${pair.user.username}: your account is ready.`);
  }

  async function login(form) {
    const data = new FormData(form);
    const identifier = String(data.get("identifier")).trim();
    const body = identifier.includes("@") ? { email: identifier } : { username: identifier };
    body.password = data.get("password");
    const pair = await request("POST", "/auth/login", { body });
    form.reset();
    await signIn(pair);
  }

  async function loadMe() {
    render(await authed("GET", "/auth/me"));
  }

  async function loadSessions() {
    const body = await authed("GET", "/auth/sessions");
    renderSessions(body.sessions);
  }

  async function reload() {
    // In parallel on purpose: when the access token has expired both calls get 401, and
    // the pair is still refreshed only once.
    const results = await Promise.allSettled([loadMe(), loadSessions()]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  async function revokeSession(id) {
    await authed("DELETE", `/auth/sessions/${encodeURIComponent(id)}`);
    await loadSessions();
    notice("The session was revoked.");
  }

  // -- Email: forgot password, reset password, verify email, change email ---------------

  async function forgotPassword(form) {
    const email = String(new FormData(form).get("email")).trim();
    await request("POST", "/auth/password-reset/request", { body: { email } });
    form.reset();
    // The API answers the same whether or not an account has the address, and so does this page.
    notice(`If an account uses ${email}, a link to choose a new password is on its way. It works once, for a limited time.`);
  }

  async function resetPassword(form) {
    const body = { token: linkToken, new_password: new FormData(form).get("new_password") };
    // A password the policy refuses spends nothing: the API's messages show, and the same link works again.
    const pair = await request("POST", "/auth/password-reset", { body });
    form.reset();
    linkToken = null;
    $("reset-view").hidden = true;
    await signIn(pair);
    notice("Your password was changed and every other device was logged out. You are logged in.");
  }

  async function verifyEmail() {
    const user = await request("POST", "/auth/verify-email", { body: { token: linkToken } });
    linkToken = null;
    $("verify-view").hidden = true;
    if (accessToken) render(user);
    notice(`Your address ${user.email} is verified.`);
  }

  async function requestVerification() {
    await authed("POST", "/auth/verify-email/request");
    notice("A new link is on its way to your address.");
  }

  async function changeEmail(form) {
    const data = new FormData(form);
    const newEmail = String(data.get("new_email")).trim();
    await authed("POST", "/auth/change-email", { new_email: newEmail, current_password: data.get("current_password") });
    form.reset();
    notice(`A link was sent to ${newEmail}: your address changes when you open it. Your current address was told.`);
  }

  // An email link: the view its path names, with the token of its fragment, which leaves
  // the address bar (and the history) at once.
  function openLink() {
    const view = { "reset-password": "reset-view", "verify-email": "verify-view" }[
      window.location.pathname.split("/").filter(Boolean).pop() || ""
    ];
    const match = /^#token=([A-Za-z0-9_-]+)$/.exec(window.location.hash);
    if (!view) return;
    window.history.replaceState(null, "", window.location.pathname);
    if (!match) {
      showError(new ApiError(400, { detail: "This link has no token: open the whole link from the message." }));
      return;
    }
    linkToken = match[1];
    $(view).hidden = false;
  }

  async function logout() {
    try {
      await authed("POST", "/auth/logout", { refresh_token: refreshToken });
    } finally {
      forgetSession(); // logged out here even when the API could not be told
    }
    notice("You are logged out.");
  }

  // -- Wiring -----------------------------------------------------------------------------

  $("api-base").textContent = API || "(set apiBaseUrl in config.js)";
  $("page-origin").textContent = window.location.origin;
  $("register-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => register(event.target));
  });
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => login(event.target));
  });
  $("forgot-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => forgotPassword(event.target));
  });
  $("reset-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => resetPassword(event.target));
  });
  $("verify-submit").addEventListener("click", () => run(verifyEmail));
  $("verify-request").addEventListener("click", () => run(requestVerification));
  $("change-email-form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(() => changeEmail(event.target));
  });
  $("reload").addEventListener("click", () => run(reload));
  $("logout").addEventListener("click", () => run(logout));
  render(null);
  openLink();
  document.documentElement.dataset.ready = "true";
})();
