/*
 * Griddle browser app: login, inbox, conversations, feed, presence and cluster view.
 *
 * Talks to the node that served it through the HTTP API of shared/API.md, and moves to
 * another member of the cluster (cross-origin, which nodes allow) when that node stops
 * answering: any node serves any request, and the sync cursor is valid on all of them.
 * One long-poll per tab (`GET /v1/sync`) delivers everything live; the rest are plain
 * requests. The token of the last sign-in is kept in localStorage, so a new tab opens
 * signed in, and each tab keeps its own in sessionStorage, so two tabs can be two users.
 * All user-provided text reaches the page through textContent only.
 */
'use strict';

(() => {
  // ---------------------------------------------------------------- constants

  const USER_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const TOKEN_KEY = 'griddle.token';
  const OPEN_KEY = 'griddle.open';
  const SKIP_SHARED_KEY = 'griddle.skipSharedToken';
  const SYNC_TIMEOUT_S = 25;
  const BACKOFF_CAP_MS = 10000;
  const RETRY_AFTER_CAP_MS = 60000;
  const PAGE_LEN = 50;
  const FEED_PAGE_LEN = 20;
  const TEXT_LEN_MAX = 2000;
  const TYPING_SEND_EVERY_MS = 2000;
  const TYPING_SHOW_MS = 4000;
  const ONLINE_EVERY_MS = 15000;
  const CLUSTER_EVERY_MS = 10000;
  const TOAST_MS = 5000;
  const REQUEST_TIMEOUT_MS = 15000; // every call but the sync long-poll, which has its own deadline
  const MOVE_AFTER_FAILURES = 2;     // network failures in a row before the tab moves to another node
  const TOASTS_MAX = 4;
  const CROCKFORD = '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
  const narrowScreen = window.matchMedia('(max-width: 699px)');

  // ---------------------------------------------------------------- state

  const state = {
    session: 0,         // bumped on login/logout so late answers are dropped
    token: null,
    me: null,
    cursor: null,
    syncAbort: null,
    syncRestarted: false,
    chats: new Map(),   // peer -> {peer, last, unread}
    unread: { total: 0, by_peer: {} },
    feed: new Map(),    // version -> event
    flags: {},
    conv: null,         // the open conversation, see newConv()
    typing: new Map(),  // peer -> timeout id
    lastTypingSent: 0,
    timers: [],
    clusterTimer: 0,
    onlineKey: '',
    base: '',           // origin of the node this tab talks to ('' = the one that served the page)
    nodes: [],          // origins of the cluster's live members, from /v1/cluster
    baseFailures: 0,    // network failures in a row on `base`
    sending: Promise.resolve(), // messages go out one after another, so they are stored in order
  };
  const chatRows = new Map(); // peer -> <li>

  // ---------------------------------------------------------------- small helpers

  const $ = (selector) => document.querySelector(selector);
  const enc = encodeURIComponent;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** Builds an element; `text` sets textContent, `on*` adds listeners, others are attributes. */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value == null || value === false) continue;
      if (key === 'text') node.textContent = value;
      else if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  /** A 26-character ULID: 48-bit millisecond time, 80 random bits, Crockford base32. */
  function ulid(now = Date.now()) {
    let time = '';
    for (let i = 0; i < 10; i++) {
      time = CROCKFORD[now % 32] + time;
      now = Math.floor(now / 32);
    }
    let random = '';
    for (const byte of crypto.getRandomValues(new Uint8Array(16))) random += CROCKFORD[byte % 32];
    return time + random;
  }

  function backoff(failures) {
    const base = Math.min(BACKOFF_CAP_MS, 500 * 2 ** Math.max(0, failures - 1));
    return Math.round(base * (0.75 + Math.random() * 0.25));
  }

  function formatTime(ms) {
    if (!ms) return '';
    const date = new Date(ms);
    if (date.toDateString() === new Date().toDateString()) {
      return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    }
    return date.toLocaleDateString([], { month: 'short', day: 'numeric' });
  }

  function avatar(name) {
    let hash = 0;
    for (const ch of name) hash = (hash * 31 + ch.codePointAt(0)) % 360;
    const node = el('span', { class: 'avatar', 'aria-hidden': 'true', text: name.slice(0, 1).toUpperCase() });
    node.style.background = `hsl(${hash} 55% 34%)`;
    return node;
  }

  function messageText(event) {
    const text = event && event.data && event.data.text;
    return typeof text === 'string' ? text : '';
  }

  /** The other user of a `chat:{a}:{b}` stream. */
  function peerOf(event) {
    const parts = String(event.stream || '').split(':');
    if (parts[0] === 'chat' && parts.length === 3) return parts[1] === state.me ? parts[2] : parts[1];
    return event.from !== state.me ? event.from : null;
  }

  function tokenUser(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const claims = JSON.parse(atob(part + '='.repeat((4 - (part.length % 4)) % 4)));
      return typeof claims.sub === 'string' && USER_RE.test(claims.sub) ? claims.sub : null;
    } catch {
      return null;
    }
  }

  function storage(kind) {
    try {
      return kind === 'local' ? window.localStorage : window.sessionStorage;
    } catch {
      return null; // storage disabled: the app still works for this page load
    }
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message, retryAfterMs) {
      super(message);
      this.status = status;
      this.code = code;
      this.retryAfterMs = retryAfterMs;
    }
  }

  function retryAfter(response) {
    const value = response.headers.get('Retry-After');
    if (!value) return undefined;
    const seconds = Number(value);
    const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
    return Number.isFinite(ms) ? Math.min(RETRY_AFTER_CAP_MS, Math.max(250, ms)) : undefined;
  }

  /** One API call. Throws ApiError (status 0 for network trouble); a 401 signs out unless `quiet`. */
  async function api(method, path, body, options = {}) {
    const token = state.token;
    const headers = {};
    if (!options.noAuth) headers.Authorization = `Bearer ${token}`;
    const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_MS);
    const signal = options.signal || timeout; // sync passes its own (longer) deadline
    const init = { method, headers, signal, cache: 'no-store' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const base = state.base;
    let response;
    try {
      response = await fetch(base + path, init);
    } catch {
      if (token === state.token) unreachable(base); // not when signing out cancelled the request
      throw new ApiError(0, 'network', 'Cannot reach the server. Retrying…');
    }
    const data = response.status === 204 ? null : await response.json().catch(() => undefined);
    if (response.ok) {
      if (data === undefined) {
        if (token === state.token) unreachable(base);
        throw new ApiError(0, 'network', 'The answer was cut off.');
      }
      if (base === state.base) state.baseFailures = 0;
      return data;
    }
    const info = (data && data.error) || {};
    const error = new ApiError(response.status, info.code || `http_${response.status}`,
      info.message || `Request failed (${response.status}).`, retryAfter(response));
    // Only the current session's token may sign the tab out (not a late answer from the last one).
    if (response.status === 401 && !options.quiet && !options.noAuth && token === state.token) onUnauthorized();
    throw error;
  }

  /**
   * The node at `base` did not answer. After a few failures in a row, talk to another live
   * member instead (one picked at random, so the tabs of a dead node spread out), if we know one.
   */
  function unreachable(base) {
    if (base !== state.base) return; // another request already moved the tab
    state.baseFailures += 1;
    const others = state.nodes.filter((origin) => origin !== base);
    if (state.baseFailures < MOVE_AFTER_FAILURES || !others.length) return;
    state.base = others[Math.floor(Math.random() * others.length)];
    state.baseFailures = 0;
    setTimeout(pollCluster, 1000); // refresh the member list (and "this tab talks to") from the new node
  }

  /** `http_addr` of a member as an origin the page can fetch (a wildcard bind means our host). */
  function originOf(httpAddr) {
    const match = /^(.*):(\d+)$/.exec(httpAddr || '');
    if (!match) return null;
    let host = match[1];
    if (host === '0.0.0.0' || host === '[::]' || host === '::') host = location.hostname;
    return `${location.protocol}//${host}:${match[2]}`;
  }

  const isTransient = (err) => [0, 429, 502, 503, 504].includes(err.status);

  /** POST that retries transient failures with the same body, so ids keep requests idempotent. */
  async function postWithRetry(path, body, attempts = 6) {
    const session = state.session;
    for (let attempt = 1; ; attempt++) {
      try {
        return await api('POST', path, body);
      } catch (err) {
        if (!isTransient(err) || attempt >= attempts || session !== state.session) throw err;
        await sleep(err.retryAfterMs ?? backoff(attempt));
      }
    }
  }

  // ---------------------------------------------------------------- status line and toasts

  let statusTimer = 0;
  function setStatus(message, kind = 'error') {
    const status = $('#status');
    status.textContent = message;
    status.dataset.kind = kind;
    clearTimeout(statusTimer);
    if (message) statusTimer = setTimeout(() => setStatus(''), kind === 'error' ? 8000 : 4000);
  }

  function setConnection(live, waitMs) {
    const conn = $('#conn');
    conn.dataset.state = live ? 'live' : 'retrying';
    conn.textContent = live ? 'Live' : `Reconnecting in ${Math.ceil(waitMs / 1000)} s…`;
  }

  function toast(text, onOpen) {
    const box = $('#toasts');
    while (box.children.length >= TOASTS_MAX) box.firstElementChild.remove();
    const node = el('button', { type: 'button', class: 'toast', text });
    node.addEventListener('click', () => { node.remove(); onOpen(); });
    box.append(node);
    setTimeout(() => node.remove(), TOAST_MS);
  }

  // ---------------------------------------------------------------- login and session

  function initialToken() {
    const session = storage('session');
    const hash = new URLSearchParams(location.hash.slice(1));
    const handed = hash.get('token');
    if (handed) {
      // Keep the token out of the address bar and history.
      history.replaceState(null, '', location.pathname + location.search);
      if (session) session.removeItem(SKIP_SHARED_KEY);
      return handed;
    }
    const own = session && session.getItem(TOKEN_KEY);
    if (own) return own;
    const shared = storage('local');
    if (shared && !(session && session.getItem(SKIP_SHARED_KEY))) return shared.getItem(TOKEN_KEY);
    return null;
  }

  function validateUser(name) {
    if (!name) return 'Please enter a user name.';
    if (name.length > 64) return 'User names are at most 64 characters.';
    if (!USER_RE.test(name)) return 'Use only letters, digits, “_” and “-” (no spaces).';
    return '';
  }

  async function onLoginSubmit(event) {
    event.preventDefault();
    const input = $('#login-user');
    const name = input.value.trim();
    const problem = validateUser(name);
    $('#login-error').textContent = problem;
    input.setAttribute('aria-invalid', problem ? 'true' : 'false');
    if (problem) return input.focus();
    const button = $('[data-testid="login-submit"]');
    button.disabled = true;
    try {
      const answer = await api('POST', '/v1/dev/token', { user: name }, { noAuth: true });
      startSession(answer.token);
    } catch (err) {
      $('#login-error').textContent = err.status === 404
        ? 'Development login is off on this node. Please sign in through the site.'
        : err.message;
    } finally {
      button.disabled = false;
    }
  }

  function startSession(token) {
    const me = tokenUser(token || '');
    if (!me) {
      showLogin('That sign-in token is not valid. Please sign in again.');
      return;
    }
    const session = storage('session');
    if (session) {
      session.setItem(TOKEN_KEY, token);
      session.removeItem(SKIP_SHARED_KEY);
    }
    const shared = storage('local');
    if (shared) shared.setItem(TOKEN_KEY, token);
    resetState();
    state.session += 1;
    state.token = token;
    state.me = me;
    $('#me-name').textContent = me;
    $('#login-screen').hidden = true;
    $('#app').hidden = false;
    showView('chats');
    runSync(state.session);
    startPolling();
    api('GET', '/v1/flags').then((answer) => applyFlags(answer.flags)).catch(() => {});
    const open = session && session.getItem(OPEN_KEY);
    if (open && USER_RE.test(open) && open !== me) openChat(open, { focus: false });
  }

  function onUnauthorized() {
    const shared = storage('local');
    if (shared && shared.getItem(TOKEN_KEY) === state.token) shared.removeItem(TOKEN_KEY);
    endSession('Your session has ended. Please sign in again.');
  }

  function endSession(message) {
    const shared = storage('local');
    if (shared && shared.getItem(TOKEN_KEY) === state.token) shared.removeItem(TOKEN_KEY); // new tabs too
    const session = storage('session');
    if (session) {
      session.removeItem(TOKEN_KEY);
      session.removeItem(OPEN_KEY);
      session.setItem(SKIP_SHARED_KEY, '1');
    }
    state.session += 1;
    if (state.syncAbort) state.syncAbort.abort();
    resetState();
    showLogin(message);
  }

  function showLogin(message) {
    $('#app').hidden = true;
    $('#login-screen').hidden = false;
    $('#login-error').textContent = message || '';
    $('#login-user').focus();
  }

  function resetState() {
    state.timers.forEach(clearInterval);
    state.typing.forEach(clearTimeout);
    Object.assign(state, {
      token: null, me: null, cursor: null, syncAbort: null, syncRestarted: false, conv: null,
      unread: { total: 0, by_peer: {} }, flags: {}, timers: [], clusterTimer: 0, lastTypingSent: 0, onlineKey: '',
    });
    state.chats.clear();
    state.feed.clear();
    state.typing.clear();
    chatRows.clear();
    for (const id of ['#chat-list', '#messages', '#feed', '#online', '#cluster-members', '#flags', '#toasts']) {
      $(id).replaceChildren();
    }
    $('#convo').hidden = true;
    $('#convo-empty').hidden = false;
    $('#cluster-panel').hidden = false;
    $('#conn').dataset.state = 'connecting';
    $('#conn').textContent = 'Connecting…';
    renderUnread();
  }

  // ---------------------------------------------------------------- sync long-poll

  async function runSync(session) {
    let failures = 0;
    while (session === state.session) {
      const controller = new AbortController();
      state.syncAbort = controller;
      // A dead connection never answers: give up on it a little after the server's timeout.
      const deadline = setTimeout(() => controller.abort(), (SYNC_TIMEOUT_S + 15) * 1000);
      const path = state.cursor
        ? `/v1/sync?since=${enc(state.cursor)}&timeout=${SYNC_TIMEOUT_S}`
        : '/v1/sync';
      try {
        const answer = await api('GET', path, undefined, { signal: controller.signal });
        if (session !== state.session) return;
        applySync(answer);
        failures = 0;
        setConnection(true);
      } catch (err) {
        if (session !== state.session || err.status === 401) return;
        if (err.status === 400 || err.status === 403) {
          // The cursor was refused: start over from a fresh snapshot.
          state.cursor = null;
          state.syncRestarted = true;
        }
        failures += 1;
        const wait = err.retryAfterMs ?? backoff(failures);
        setConnection(false, wait);
        await sleep(wait);
      } finally {
        clearTimeout(deadline);
      }
    }
  }

  function applySync(answer) {
    if (!answer || typeof answer.cursor !== 'string') {
      throw new ApiError(0, 'bad_answer', 'Unexpected answer from the server.');
    }
    if (answer.feed || answer.chats) {
      applySnapshot(answer);
      pollOnline();
    }
    for (const item of answer.events || []) applyItem(item);
    if (answer.unread) applyUnread(answer.unread);
    state.cursor = answer.cursor;
    if ((answer.reset || state.syncRestarted) && state.conv) reloadConversation();
    state.syncRestarted = false;
  }

  function applySnapshot(answer) {
    state.chats.clear();
    for (const chat of answer.chats || []) {
      state.chats.set(chat.peer, { peer: chat.peer, last: chat.last, unread: chat.unread || 0 });
    }
    state.feed.clear();
    for (const event of (answer.feed && answer.feed.events) || []) state.feed.set(event.version, event);
    renderChats();
    renderFeed();
  }

  function applyItem(item) {
    switch (item.type) {
      case 'chat.message': return onChatMessage(item);
      case 'chat.typing': return onTyping(item.from, item.time);
      case 'chat.read': return onRead(item.peer, item.version);
      case 'flags': return applyFlags(item.flags);
      default:
        if (typeof item.stream === 'string' && item.stream.startsWith('feed:')) onFeedEvent(item);
    }
  }

  function applyUnread(unread) {
    state.unread = { total: unread.total || 0, by_peer: unread.by_peer || {} };
    for (const chat of state.chats.values()) chat.unread = state.unread.by_peer[chat.peer] || 0;
    renderUnread();
    renderChats();
    if (state.conv && state.unread.by_peer[state.conv.peer]) markRead();
  }

  function onChatMessage(event) {
    const peer = peerOf(event);
    if (!peer || typeof event.version !== 'number') return;
    const chat = state.chats.get(peer) || { peer, last: null, unread: 0 };
    if (!chat.last || event.version >= chat.last.version) chat.last = event;
    state.chats.set(peer, chat);
    if (event.from === peer) clearTyping(peer);
    const open = state.conv && state.conv.peer === peer;
    if (open) {
      // The server moves the sender's own marker to their message: no need to post it again.
      if (event.from === state.me) state.conv.readSent = Math.max(state.conv.readSent, event.version);
      insertLive(state.conv, event);
      markRead();
    } else if (event.from !== state.me) {
      toast(`${event.from}: ${messageText(event).slice(0, 80)}`, () => openChat(peer));
    }
    renderChats();
  }

  function onRead(peer, version) {
    const chat = state.chats.get(peer);
    if (chat && chat.last && chat.last.version <= version) chat.unread = 0;
    renderChats();
  }

  // ---------------------------------------------------------------- typing

  function onTyping(from, time) {
    if (!from || from === state.me) return;
    // Someone new starts writing to us: their conversation shows up now, marked "typing…"
    // (placed by the server's time, like the others).
    if (!state.chats.has(from)) state.chats.set(from, { peer: from, last: null, unread: 0, since: time || 0 });
    clearTimeout(state.typing.get(from));
    state.typing.set(from, setTimeout(() => clearTyping(from), TYPING_SHOW_MS));
    renderTyping();
    renderChats();
  }

  function clearTyping(peer) {
    if (!state.typing.has(peer)) return;
    clearTimeout(state.typing.get(peer));
    state.typing.delete(peer);
    const chat = state.chats.get(peer);
    if (chat && !chat.last && !(state.conv && state.conv.peer === peer)) state.chats.delete(peer); // they never wrote
    renderTyping();
    renderChats();
  }

  function renderTyping() {
    const peer = state.conv && state.conv.peer;
    const indicator = $('#typing');
    const show = Boolean(peer && state.typing.has(peer));
    indicator.textContent = show ? `${peer} is typing…` : '';
    indicator.hidden = !show;
  }

  function onComposerInput() {
    autosize();
    const conv = state.conv;
    const now = Date.now();
    if (!conv || !$('#message-input').value.trim() || now - state.lastTypingSent < TYPING_SEND_EVERY_MS) return;
    state.lastTypingSent = now;
    api('POST', `/v1/chats/${enc(conv.peer)}/typing`).catch(() => {});
  }

  function autosize() {
    const input = $('#message-input');
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
  }

  // ---------------------------------------------------------------- unread and chat list

  function renderUnread() {
    const badge = $('#unread-total');
    const total = state.unread.total;
    badge.textContent = String(total);
    badge.classList.toggle('zero', total === 0);
    document.title = total ? `(${total}) Griddle` : 'Griddle';
  }

  function byRecent(a, b) {
    const time = (chat) => (chat.last ? chat.last.time || 0 : chat.since || 0);
    return time(b) - time(a) || a.peer.localeCompare(b.peer);
  }

  function renderChats() {
    const list = $('#chat-list');
    const chats = [...state.chats.values()].sort(byRecent);
    chats.forEach((chat, index) => {
      let row = chatRows.get(chat.peer);
      if (!row) {
        row = chatRow(chat.peer);
        chatRows.set(chat.peer, row);
      }
      fillChatRow(row, chat);
      // Move only rows that are out of place, so a focused row keeps its focus.
      if (list.children[index] !== row) list.insertBefore(row, list.children[index] || null);
    });
    for (const [peer, row] of chatRows) {
      if (!state.chats.has(peer)) {
        row.remove();
        chatRows.delete(peer);
      }
    }
    $('#chats-empty').hidden = chats.length > 0;
  }

  function chatRow(peer) {
    const button = el('button', { type: 'button', class: 'chat-item', 'data-testid': 'chat-item', 'data-peer': peer,
      onclick: () => openChat(peer) },
    avatar(peer),
    el('span', { class: 'chat-main' },
      el('span', { class: 'chat-top' }, el('span', { class: 'chat-peer', text: peer }), el('span', { class: 'chat-time' })),
      el('span', { class: 'chat-bottom' }, el('span', { class: 'chat-preview' }), el('span', { class: 'badge' }))));
    return el('li', {}, button);
  }

  function fillChatRow(row, chat) {
    const button = row.firstElementChild;
    const typing = state.typing.has(chat.peer);
    const last = chat.last;
    const mine = last && last.from === state.me;
    const preview = row.querySelector('.chat-preview');
    preview.textContent = typing ? 'typing…' : last ? `${mine ? 'You: ' : ''}${messageText(last)}` : '';
    preview.classList.toggle('is-typing', typing);
    row.querySelector('.chat-time').textContent = last ? formatTime(last.time) : '';
    const badge = row.querySelector('.badge');
    badge.hidden = !chat.unread;
    badge.replaceChildren(String(chat.unread || 0), el('span', { class: 'sr-only', text: ' unread' }));
    button.classList.toggle('has-unread', chat.unread > 0);
    if (state.conv && state.conv.peer === chat.peer) button.setAttribute('aria-current', 'true');
    else button.removeAttribute('aria-current');
  }

  function onNewChat(event) {
    event.preventDefault();
    const input = $('#new-chat-peer');
    const name = input.value.trim();
    let problem = validateUser(name);
    if (!problem && name === state.me) problem = 'That is you. Pick someone else to chat with.';
    $('#new-chat-error').textContent = problem;
    input.setAttribute('aria-invalid', problem ? 'true' : 'false');
    if (problem) return input.focus();
    input.value = '';
    openChat(name);
  }

  // ---------------------------------------------------------------- conversation

  function newConv(peer) {
    return {
      peer,
      gen: 0,               // bumped when history is reloaded, to drop stale pages
      shown: new Map(),     // version -> element
      pending: new Map(),   // message id -> element, until the server gives it a version
      oldest: Infinity,
      highest: 0,
      readSent: 0,
      loadingOlder: false,
      reachedStart: false,
    };
  }

  function openChat(peer, { focus = true } = {}) {
    showView('convo');
    if (state.conv && state.conv.peer === peer) {
      if (focus) $('#message-input').focus();
      return markRead();
    }
    const left = state.conv && state.chats.get(state.conv.peer);
    if (left && !left.last && !state.typing.has(left.peer)) state.chats.delete(left.peer); // never written to
    state.conv = newConv(peer);
    state.lastTypingSent = 0;
    const session = storage('session');
    if (session) session.setItem(OPEN_KEY, peer);
    $('#convo-empty').hidden = true;
    $('#convo').hidden = false;
    $('#convo-peer').textContent = peer;
    $('#convo-avatar').replaceWith(Object.assign(avatar(peer), { id: 'convo-avatar' }));
    $('#messages').replaceChildren();
    $('#message-input').value = '';
    autosize();
    renderTyping();
    renderChats();
    loadNewest(state.conv);
    if (focus) $('#message-input').focus();
  }

  function reloadConversation() {
    const conv = state.conv;
    for (const node of conv.shown.values()) node.remove();
    Object.assign(conv, { gen: conv.gen + 1, shown: new Map(), oldest: Infinity, highest: 0, readSent: 0,
      loadingOlder: false, reachedStart: false });
    loadNewest(conv);
  }

  async function loadNewest(conv) {
    const gen = conv.gen;
    const list = $('#messages');
    list.setAttribute('aria-busy', 'true');
    try {
      const page = await api('GET', `/v1/chats/${enc(conv.peer)}/messages?limit=${PAGE_LEN}`);
      if (conv !== state.conv || gen !== conv.gen) return;
      const events = page.events || [];
      conv.reachedStart = events.length < PAGE_LEN || events[0].version <= 1;
      events.forEach((event) => insertMessage(conv, event));
      scrollToBottom();
      markRead();
    } catch (err) {
      if (conv === state.conv && err.status !== 401) setStatus(err.message);
    } finally {
      list.removeAttribute('aria-busy');
      updateOlderButton();
    }
  }

  async function loadOlder() {
    const conv = state.conv;
    if (!conv || conv.loadingOlder || conv.reachedStart || conv.oldest === Infinity) return;
    conv.loadingOlder = true;
    const gen = conv.gen;
    const scroller = $('#messages-scroll');
    try {
      const page = await api('GET', `/v1/chats/${enc(conv.peer)}/messages?before=${conv.oldest}&limit=${PAGE_LEN}`);
      if (conv !== state.conv || gen !== conv.gen) return;
      const events = page.events || [];
      conv.reachedStart = events.length < PAGE_LEN || events[0].version <= 1;
      const fromBottom = scroller.scrollHeight - scroller.scrollTop;
      events.forEach((event) => insertMessage(conv, event));
      scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the reader's place
    } catch (err) {
      if (err.status !== 401) setStatus(err.message);
    } finally {
      conv.loadingOlder = false;
      updateOlderButton();
    }
  }

  function updateOlderButton() {
    const conv = state.conv;
    $('#older').hidden = !conv || conv.reachedStart || conv.oldest === Infinity;
  }

  /** A live message: keep the view at the bottom if the reader was there (or wrote it). */
  function insertLive(conv, event) {
    const scroller = $('#messages-scroll');
    const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
    if (insertMessage(conv, event) && (atBottom || event.from === state.me)) scrollToBottom();
  }

  /** Shows `event` in version order, once; confirms a pending copy with the same id. */
  function insertMessage(conv, event) {
    if (conv.shown.has(event.version)) return false;
    let node = conv.pending.get(event.id);
    if (node) {
      conv.pending.delete(event.id);
      node.classList.remove('pending', 'failed');
      node.querySelector('.meta').replaceChildren(formatTime(event.time));
    } else {
      node = messageNode(event);
    }
    node.dataset.version = String(event.version);
    conv.shown.set(event.version, node);
    conv.oldest = Math.min(conv.oldest, event.version);
    conv.highest = Math.max(conv.highest, event.version);
    const list = $('#messages');
    const next = [...list.children].find((child) => !child.dataset.version || Number(child.dataset.version) > event.version);
    list.insertBefore(node, next || null);
    return true;
  }

  function messageNode(event) {
    const mine = event.from === state.me;
    return el('li', { class: `message ${mine ? 'own' : 'theirs'}`, 'data-testid': 'message', 'data-id': event.id },
      el('span', { class: 'sr-only', text: mine ? 'You: ' : `${event.from}: ` }),
      el('p', { class: 'bubble', text: messageText(event) }),
      el('span', { class: 'meta', text: formatTime(event.time) }));
  }

  function scrollToBottom() {
    const scroller = $('#messages-scroll');
    scroller.scrollTop = scroller.scrollHeight;
  }

  function convVisible() {
    return document.visibilityState === 'visible' && !(narrowScreen.matches && document.body.dataset.view !== 'convo');
  }

  /** Tells the server everything shown in the open conversation is read. */
  function markRead() {
    const conv = state.conv;
    if (!conv || conv.highest <= conv.readSent || !convVisible()) return;
    const version = conv.highest;
    const previous = conv.readSent;
    conv.readSent = version;
    api('POST', `/v1/chats/${enc(conv.peer)}/read`, { version }).catch(() => {
      if (conv.readSent === version) conv.readSent = previous; // try again on the next trigger
    });
  }

  // ---------------------------------------------------------------- sending

  function onComposerKey(event) {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      onSend(event);
    }
  }

  function onSend(event) {
    event.preventDefault();
    const conv = state.conv;
    const input = $('#message-input');
    const text = input.value.trim();
    if (!conv || !text) return;
    if ([...text].length > TEXT_LEN_MAX) return setStatus(`Messages can be at most ${TEXT_LEN_MAX} characters.`);
    input.value = '';
    autosize();
    state.lastTypingSent = 0; // the peer's "typing" ended with this message: the next key starts a new one
    const id = ulid();
    const node = messageNode({ id, from: state.me, time: Date.now(), data: { text } });
    node.classList.add('pending');
    node.querySelector('.meta').textContent = 'Sending…';
    conv.pending.set(id, node);
    $('#messages').append(node);
    scrollToBottom();
    // One after another: each waits for the one before (and its retries), so a burst typed
    // during a failover is stored in the order it was written.
    const peer = conv.peer;
    state.sending = state.sending.then(() => deliver(peer, id, text));
  }

  async function deliver(peer, id, text) {
    const session = state.session;
    try {
      const answer = await postWithRetry(`/v1/chats/${enc(peer)}/messages`, { id, text });
      if (session === state.session && answer && answer.event) onChatMessage(answer.event);
    } catch (err) {
      if (session === state.session && err.status !== 401) markFailed(peer, id, text, err);
    }
  }

  function markFailed(peer, id, text, err) {
    const node = state.conv && state.conv.peer === peer && state.conv.pending.get(id);
    if (!node) return setStatus(`Message to ${peer} was not sent: ${err.message}`);
    node.classList.add('failed');
    const retry = el('button', { type: 'button', class: 'link', text: 'Retry' });
    retry.addEventListener('click', () => {
      node.classList.remove('failed');
      node.querySelector('.meta').textContent = 'Sending…';
      deliver(peer, id, text); // same id: the server stores it at most once
    });
    node.querySelector('.meta').replaceChildren(`Not sent: ${err.message} `, retry);
  }

  async function sendFeedAction(kind) {
    const conv = state.conv;
    if (!conv) return;
    const button = kind === 'flirts' ? $('#flirt') : $('#visit');
    button.disabled = true;
    try {
      await postWithRetry(`/v1/users/${enc(conv.peer)}/${kind}`, { id: ulid() });
      setStatus(kind === 'flirts' ? `You flirted with ${conv.peer} ♥` : `You visited ${conv.peer}'s profile.`, 'info');
    } catch (err) {
      if (err.status !== 401) setStatus(err.message);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- feed

  function onFeedEvent(event) {
    if (typeof event.version !== 'number' || state.feed.has(event.version)) return;
    state.feed.set(event.version, event);
    renderFeed();
    if (event.from && event.from !== state.me) toast(feedText(event), () => openChat(event.from));
  }

  function feedText(event) {
    if (event.type === 'feed.flirt') return `${event.from} flirted with you ♥`;
    if (event.type === 'feed.visit') return `${event.from} visited your profile`;
    return `${event.from}: ${event.type}`;
  }

  function renderFeed() {
    const events = [...state.feed.values()].sort((a, b) => b.version - a.version);
    const items = events.map((event) => {
      const action = event.type === 'feed.flirt' ? ' flirted with you ♥'
        : event.type === 'feed.visit' ? ' visited your profile' : ` ${event.type}`;
      const name = event.from && event.from !== state.me
        ? el('button', { type: 'button', class: 'link', text: event.from, title: `Chat with ${event.from}`,
          onclick: () => openChat(event.from) })
        : el('strong', { text: event.from || 'someone' });
      return el('li', { class: `feed-item ${String(event.type || '').replace('.', '-')}`, 'data-testid': 'feed-item',
        'data-version': event.version },
      avatar(event.from || '?'),
      el('span', { class: 'feed-text' }, name, action),
      el('span', { class: 'feed-time', text: formatTime(event.time) }));
    });
    $('#feed').replaceChildren(...items);
    $('#feed-empty').hidden = items.length > 0;
    const oldest = events.length ? events[events.length - 1].version : 0;
    $('#feed-older').hidden = oldest <= 1;
  }

  async function loadOlderFeed() {
    const versions = [...state.feed.keys()];
    if (!versions.length) return;
    const session = state.session;
    const button = $('#feed-older');
    button.disabled = true;
    try {
      const page = await api('GET', `/v1/feed?before=${Math.min(...versions)}&limit=${FEED_PAGE_LEN}`);
      if (session !== state.session) return;
      for (const event of page.events || []) state.feed.set(event.version, event);
      renderFeed();
    } catch (err) {
      if (err.status !== 401) setStatus(err.message);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------- presence, cluster, flags

  function startPolling() {
    // The online list is first asked for after the first sync answer, which counts us in.
    pollCluster();
    state.timers.push(setInterval(pollOnline, ONLINE_EVERY_MS));
    state.clusterTimer = setInterval(pollCluster, CLUSTER_EVERY_MS);
    state.timers.push(state.clusterTimer);
  }

  async function pollOnline() {
    const session = state.session;
    try {
      const answer = await api('GET', '/v1/online?limit=50');
      if (session === state.session) renderOnline(answer.users || [], answer.total);
    } catch {
      // Presence is a nicety: keep the last list and try again on the next tick.
    }
  }

  function renderOnline(users, total) {
    const key = JSON.stringify([users, total]);
    if (key === state.onlineKey) return; // unchanged: do not disturb focus
    state.onlineKey = key;
    $('#online-count').textContent = `(${total ?? users.length})`;
    $('#online').replaceChildren(...users.map((user) => el('li', {},
      user === state.me
        ? el('span', { class: 'online-user me-row', 'data-testid': 'online-user', 'data-user': user },
          el('span', { class: 'dot', 'aria-hidden': 'true' }), `${user} (you)`)
        : el('button', { type: 'button', class: 'online-user', 'data-testid': 'online-user', 'data-user': user,
          title: `Chat with ${user}`, onclick: () => openChat(user) },
        el('span', { class: 'dot', 'aria-hidden': 'true' }), user))));
  }

  async function pollCluster() {
    const session = state.session;
    const base = state.base;
    try {
      const info = await api('GET', '/v1/cluster', undefined, { quiet: true });
      if (session === state.session && base === state.base) renderCluster(info); // not a late answer of a node we left
    } catch (err) {
      if (session !== state.session || ![401, 403, 404].includes(err.status)) return;
      // Not allowed from here: hide the panel and stop asking.
      $('#cluster-panel').hidden = true;
      clearInterval(state.clusterTimer);
    }
  }

  function renderCluster(info) {
    const here = location.origin;
    state.nodes = (info.members || [])
      .filter((member) => member.state === 'alive')
      .map((member) => originOf(member.http_addr))
      .filter(Boolean)
      .map((origin) => (origin === here ? '' : origin));
    if (!state.nodes.includes(state.base)) state.nodes.push(state.base);
    $('#cluster-panel').hidden = false;
    $('#cluster-node').textContent = `This tab talks to ${info.node}`;
    $('#cluster-members').replaceChildren(...(info.members || []).map((member) =>
      el('li', { class: `member${member.id === info.node ? ' here' : ''}`, 'data-testid': 'cluster-member',
        'data-node': member.id, 'data-state': member.state },
      el('span', { class: `state state-${member.state}`, text: member.state }),
      el('span', { class: 'member-id', text: member.id }),
      el('span', { class: 'member-addr muted', text: member.http_addr || '' }))));
    const parts = info.partitions;
    $('#cluster-partitions').textContent = parts
      ? `${parts.count} partitions × ${parts.replicas} replicas; primary here: ${parts.primary_here}, replica here: ${parts.replica_here}`
      : '';
  }

  function applyFlags(flags) {
    state.flags = flags && typeof flags === 'object' ? flags : {};
    const entries = Object.entries(state.flags).sort(([a], [b]) => a.localeCompare(b));
    $('#flags-title').hidden = entries.length === 0;
    $('#flags').replaceChildren(...entries.map(([name, on]) =>
      el('li', { class: on ? 'on' : 'off', 'data-flag': name }, el('code', { text: name }), on ? ' on' : ' off')));
  }

  // ---------------------------------------------------------------- views (phone layout)

  function showView(view) {
    document.body.dataset.view = view;
    for (const button of document.querySelectorAll('[data-view-target]')) {
      button.setAttribute('aria-pressed', String(button.dataset.viewTarget === view));
    }
    if (view === 'convo') markRead();
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    $('#login-form').addEventListener('submit', onLoginSubmit);
    $('#login-user').addEventListener('input', () => { $('#login-error').textContent = ''; });
    $('#logout').addEventListener('click', () => endSession(''));
    $('#new-chat-form').addEventListener('submit', onNewChat);
    $('#new-chat-peer').addEventListener('input', () => { $('#new-chat-error').textContent = ''; });
    $('#composer').addEventListener('submit', onSend);
    $('#message-input').addEventListener('keydown', onComposerKey);
    $('#message-input').addEventListener('input', onComposerInput);
    $('#messages-scroll').addEventListener('scroll', () => {
      if ($('#messages-scroll').scrollTop < 60) loadOlder();
    });
    $('#older').addEventListener('click', loadOlder);
    $('#feed-older').addEventListener('click', loadOlderFeed);
    $('#flirt').addEventListener('click', () => sendFeedAction('flirts'));
    $('#visit').addEventListener('click', () => sendFeedAction('visits'));
    $('#back').addEventListener('click', () => showView('chats'));
    $('#pane-convo').addEventListener('keydown', (event) => {
      if (event.key === 'Escape' && narrowScreen.matches) showView('chats');
    });
    for (const button of document.querySelectorAll('[data-view-target]')) {
      button.addEventListener('click', () => showView(button.dataset.viewTarget));
    }
    document.addEventListener('visibilitychange', markRead);
    window.addEventListener('focus', markRead);
    narrowScreen.addEventListener('change', markRead);
  }

  function boot() {
    wire();
    const token = initialToken();
    if (token) startSession(token);
    else showLogin('');
  }

  boot();
})();
