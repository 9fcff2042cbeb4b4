// authapp example frontend: register, log in, show the user, list and revoke sessions, log out;
// forgot password, reset password, verify email, change email (the pages the email links open);
// two-factor authentication: set up an authenticator app, the second step of a login, new
// recovery codes, turning it off.
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
  let mfaToken = null; // between the password and the second step of a login, held likewise
  let mfaTimer = null; // ends the second step when the mfa_token expires

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

  // A 401 that ends the session in the page. INVALID_CREDENTIALS does not: it answers a wrong
  // current_password (two-factor settings, change of email), and the session is still good.
  function endsSession(err) {
    return err instanceof ApiError && err.status === 401 && !isExpired(err) && err.code !== "INVALID_CREDENTIALS";
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
      if (endsSession(err)) forgetSession();
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
    $("signed-out").hidden = Boolean(user) || Boolean(mfaToken);
    if (!user) {
      $("sessions").replaceChildren();
      // The key and the recovery codes leave the page with the session.
      hideEnrollment();
      hideRecoveryCodes();
      return;
    }
    $("me-username").textContent = user.username;
    $("me-id").textContent = String(user.id);
    $("me-email").textContent = user.email;
    $("me-email-verified").textContent = user.email_verified ? "yes" : "no";
    $("verify-request").hidden = Boolean(user.email_verified);
    $("me-created-at").textContent = user.created_at;
    $("me-last-login").textContent = user.last_login || "never";
    $("me-mfa").textContent = user.mfa_enabled ? "on" : "off";
    $("mfa-on").hidden = !user.mfa_enabled;
    $("mfa-off").hidden = Boolean(user.mfa_enabled) || !$("mfa-enroll").hidden;
  }

  // The QR code is an SVG document from the API. It goes into the page as the source of an
  // <img>, never as markup: an SVG shown as an image runs no script, loads nothing and takes
  // no events, whatever it contains, while SVG markup inserted into the page (innerHTML)
  // would be live, with <script>, event attributes and links. data: is the one addition to
  // the page's img-src for it.
  function showEnrollment(setup) {
    $("mfa-qr").src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(setup.qr_svg)}`;
    $("mfa-secret").textContent = setup.secret;
    // A link opens an authenticator app on a phone; only an otpauth: URI may become one,
    // never a javascript: or http: URL.
    const uri = String(setup.otpauth_uri || "");
    const link = $("mfa-otpauth");
    link.hidden = !uri.startsWith("otpauth://");
    if (link.hidden) link.removeAttribute("href");
    else link.href = uri;
    $("mfa-enroll").hidden = false;
    $("mfa-off").hidden = true;
  }

  function hideEnrollment() {
    $("mfa-enroll").hidden = true;
    $("mfa-qr").removeAttribute("src");
    $("mfa-secret").textContent = "";
    $("mfa-otpauth").removeAttribute("href");
    $("mfa-enable-form").reset();
  }

  function showRecoveryCodes(codes) {
    const items = codes.map((code) => {
      const li = document.createElement("li");
      li.dataset.testid = "recovery-code";
      li.textContent = code;
      return li;
    });
    $("mfa-recovery-codes").replaceChildren(...items);
    $("mfa-codes").hidden = false;
  }

  function hideRecoveryCodes() {
    $("mfa-recovery-codes").replaceChildren();
    $("mfa-codes").hidden = true;
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
        `last used ${session.last_used_at || "never"} · ends ${session.expires_at}` +
        (session.aal === "aal2" ? " · with two-factor authentication" : "");
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
    const answer = await request("POST", "/auth/login", { body });
    form.reset();
    if (answer.mfa_required) {
      startMfaStep(answer);
      return;
    }
    await signIn(answer);
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
    const answer = await request("POST", "/auth/password-reset", { body });
    form.reset();
    linkToken = null;
    $("reset-view").hidden = true;
    if (answer.mfa_required) {
      startMfaStep(answer);
      notice("Your password was changed and every other device was logged out. Enter a code to log in.");
      return;
    }
    await signIn(answer);
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

  // -- Two-factor authentication ----------------------------------------------------------

  function startMfaStep(challenge) {
    mfaToken = challenge.mfa_token;
    clearTimeout(mfaTimer);
    // The API refuses the token after expires_in seconds; the page lets go of it then too.
    mfaTimer = setTimeout(() => {
      endMfaStep();
      clearMessages();
      notice("The login timed out before the second step: log in again.");
    }, Number(challenge.expires_in || 300) * 1000);
    $("signed-out").hidden = true;
    $("mfa-step").hidden = false;
    $("mfa-verify-code").focus();
  }

  function endMfaStep() {
    mfaToken = null;
    clearTimeout(mfaTimer);
    mfaTimer = null;
    $("mfa-verify-form").reset();
    $("mfa-recovery-form").reset();
    $("mfa-step").hidden = true;
    $("signed-out").hidden = Boolean(accessToken);
  }

  // Apps show a code as "123 456", and a pasted one may keep the space.
  function totpCode(form) {
    return String(new FormData(form).get("code")).replace(/\s+/g, "");
  }

  // The second step, with a code from the app or a recovery code. A wrong code keeps the
  // step open: the mfa_token is spent only by a success. Any other 401 means that no code
  // can help any more (the token expired or was used, the password changed meanwhile):
  // back to the password.
  async function verifyMfa(form, field) {
    const value = field === "code" ? totpCode(form) : String(new FormData(form).get(field)).trim();
    form.reset();
    let pair;
    try {
      pair = await request("POST", "/auth/mfa/verify", { body: { mfa_token: mfaToken, [field]: value } });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401 && err.code !== "INVALID_MFA_CODE") endMfaStep();
      throw err;
    }
    endMfaStep();
    await signIn(pair);
    if (field === "recovery_code") {
      notice("You are logged in. That recovery code is used up: make new ones if few are left.");
    }
  }

  async function setupMfa(form) {
    const setup = await authed("POST", "/auth/mfa/totp/setup", {
      current_password: new FormData(form).get("current_password"),
    });
    form.reset();
    hideRecoveryCodes();
    showEnrollment(setup);
    $("mfa-enable-code").focus();
  }

  async function enableMfa(form) {
    const body = await authed("POST", "/auth/mfa/totp/enable", { code: totpCode(form) });
    hideEnrollment();
    showRecoveryCodes(body.recovery_codes);
    await reload(); // MFA is on now, and every other session was logged out
    notice("Two-factor authentication is on. Every other device was logged out.");
  }

  async function regenerateRecoveryCodes(form) {
    const body = await authed("POST", "/auth/mfa/recovery-codes", {
      current_password: new FormData(form).get("current_password"),
    });
    form.reset();
    showRecoveryCodes(body.recovery_codes);
    notice("Here are your new recovery codes: the old ones no longer work.");
  }

  async function disableMfa(form) {
    await authed("POST", "/auth/mfa/disable", { current_password: new FormData(form).get("current_password") });
    form.reset();
    hideRecoveryCodes();
    await reload();
    notice("Two-factor authentication is off. Every other device was logged out.");
  }

  async function copyRecoveryCodes() {
    const list = $("mfa-recovery-codes");
    const codes = Array.from(list.children, (li) => li.textContent);
    try {
      await navigator.clipboard.writeText(codes.join("\n") + "\n");
      notice("The recovery codes are on the clipboard.");
    } catch (err) {
      // No clipboard (a page not served over HTTPS, or a browser that refuses): select them instead.
      window.getSelection().selectAllChildren(list);
      notice("The browser did not let the page copy: the codes are selected, copy them with Ctrl+C (⌘C).");
    }
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
  const onSubmit = (testid, action) =>
    $(testid).addEventListener("submit", (event) => {
      event.preventDefault();
      run(() => action(event.target));
    });
  onSubmit("register-form", register);
  onSubmit("login-form", login);
  onSubmit("forgot-form", forgotPassword);
  onSubmit("reset-form", resetPassword);
  $("verify-submit").addEventListener("click", () => run(verifyEmail));
  $("verify-request").addEventListener("click", () => run(requestVerification));
  onSubmit("change-email-form", changeEmail);
  onSubmit("mfa-verify-form", (form) => verifyMfa(form, "code"));
  onSubmit("mfa-recovery-form", (form) => verifyMfa(form, "recovery_code"));
  $("mfa-cancel").addEventListener("click", () => {
    clearMessages();
    endMfaStep();
  });
  onSubmit("mfa-setup-form", setupMfa);
  onSubmit("mfa-enable-form", enableMfa);
  $("mfa-enroll-cancel").addEventListener("click", () => {
    clearMessages();
    hideEnrollment();
    $("mfa-off").hidden = false;
  });
  $("mfa-codes-copy").addEventListener("click", () => run(copyRecoveryCodes));
  $("mfa-codes-done").addEventListener("click", () => {
    clearMessages();
    hideRecoveryCodes();
  });
  onSubmit("mfa-regenerate-form", regenerateRecoveryCodes);
  onSubmit("mfa-disable-form", disableMfa);
  $("reload").addEventListener("click", () => run(reload));
  $("logout").addEventListener("click", () => run(logout));
  render(null);
  openLink();
  document.documentElement.dataset.ready = "true";
})();
