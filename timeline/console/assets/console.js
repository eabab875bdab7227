// The timeline console: drives the API of the service that serves it, from the same origin.
// No framework and no build step. Every node is made with createElement and textContent:
// messages and ids are user data, never parsed as HTML.
"use strict";

const TOKEN_KEY = "timeline.console.token"; // sessionStorage: kept for this tab only
const REFRESH_MS = 5000;
const MAX_PAGES = 50; // one Sync click pulls at most this many pages; the next click continues
// Follow keeps one sync waiting this long: under the service's sync_wait_max_ms (30 s) and
// the compose proxy's read timeout (35 s), so a wait ends as the service answers it.
const FOLLOW_WAIT_MS = 25000;
const FOLLOW_RETRY_MS = 2000; // after a failure that may pass (no reply, 5xx); doubling
const FOLLOW_ROWS_MAX = 500; // entries shown while following; the oldest go first
const ACTIVITY_MAX = 40;

// --- DOM ------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with attributes and children: nodes, text, or lists of them (flattened). */
function h(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false || value === "") continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const code = (text) => h("code", {}, text);

// --- The API --------------------------------------------------------------------------------

/** A reply that was not a success: its status and go-timeline's envelope. */
class ApiError extends Error {
  constructor(status, envelope, requestId) {
    super(envelope.message);
    this.status = status;
    this.envelope = envelope;
    this.requestId = requestId;
  }
}

function isEnvelope(data) {
  return data !== null && typeof data === "object" && "reason" in data && "message" in data;
}

/** Calls a route; the parsed JSON of a 2xx, else an ApiError. A 401 asks for the token and,
    once one is given, sends the request again (nothing was done the first time). A call
    aborted through `signal` rejects with the abort itself, unlogged. */
async function api(method, path, body, { quiet = false, signal } = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = {};
    if (token && path.startsWith("/timeline/")) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const started = performance.now();
    let reply;
    try {
      reply = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        signal,
      });
    } catch (failure) {
      if (signal && signal.aborted) throw failure;
      const message = `the service did not answer (${failure.message})`;
      const envelope = { code: 0, reason: "NO_REPLY", message, metadata: {} };
      if (!quiet) logCall(method, path, body, 0, performance.now() - started, "", envelope.message);
      throw new ApiError(0, envelope, "");
    }
    const text = await reply.text();
    const requestId = reply.headers.get("X-Request-ID") || "";
    if (!quiet) logCall(method, path, body, reply.status, performance.now() - started, requestId, text);
    let data = null;
    try {
      data = JSON.parse(text);
    } catch {
      // Not JSON: shown as the message below.
    }
    if (reply.ok) return data;
    const envelope = isEnvelope(data)
      ? data
      : { code: reply.status, reason: "", message: text.slice(0, 500), metadata: {} };
    if (reply.status === 401 && envelope.reason === "TIMELINE_UNAUTHORIZED") {
      const reason = token
        ? "The service refused this token (401 TIMELINE_UNAUTHORIZED)."
        : "This service needs a bearer token for /timeline/* (401 TIMELINE_UNAUTHORIZED).";
      if (await askToken(reason)) continue;
    }
    throw new ApiError(reply.status, envelope, requestId);
  }
}

/** One line per call in "Requests made by this page", its bodies behind a click. */
function logCall(method, path, body, status, ms, requestId, replyText) {
  const ok = status >= 200 && status < 300;
  const line = h(
    "li",
    { class: ok ? "" : "failed" },
    h(
      "details",
      {},
      h("summary", {}, `${method} ${path} → ${status || "no reply"} · ${Math.round(ms)} ms`),
      body === undefined ? null : h("pre", {}, `request ${JSON.stringify(body)}`),
      h("pre", {}, `reply ${replyText}`),
      requestId ? h("pre", {}, `X-Request-ID ${requestId}`) : null,
    ),
  );
  const list = $("activity");
  list.prepend(line);
  while (list.children.length > ACTIVITY_MAX) list.lastElementChild.remove();
}

// --- What replies look like ---------------------------------------------------------------

/** An error with everything the envelope says: code, reason, message, metadata. */
function errorBox(failure) {
  const envelope =
    failure instanceof ApiError
      ? failure.envelope
      : { reason: "CONSOLE_ERROR", message: String(failure), metadata: {} };
  const metadata = Object.entries(envelope.metadata || {});
  return h(
    "div",
    { class: "error", role: "alert" },
    h("strong", { class: "reason" }, `${failure.status || ""} ${envelope.reason}`.trim()),
    " ",
    h("span", { class: "message" }, envelope.message),
    metadata.length
      ? h(
          "dl",
          { class: "metadata" },
          metadata.map(([key, value]) => [
            h("dt", {}, key),
            h("dd", {}, Array.isArray(value) ? JSON.stringify(value) : String(value)),
          ]),
        )
      : null,
    failure.requestId ? h("div", { class: "hint" }, `X-Request-ID ${failure.requestId}`) : null,
  );
}

function replyBox(summary, data) {
  return h(
    "div",
    { class: "reply" },
    h("div", { class: "summary" }, summary),
    h("pre", {}, JSON.stringify(data)),
  );
}

/** "2026-11-27T00:59:08.341Z" as "2026-11-27 00:59:08.341"; old documents have none. */
function when(timestamp) {
  return timestamp ? timestamp.replace("T", " ").replace("Z", "") : "—";
}

/** A sync entry's conversation: "single b #2" (its type, name and conversationSeq); "—" for
    a copy stored before entries recorded it. */
function conversationOf(entry) {
  if (!entry.type) return "—";
  return [
    h("span", { class: "conv-type" }, entry.type),
    " ",
    h("span", { class: "conv-name" }, entry.conversation),
    " ",
    h("span", { class: "conv-seq" }, `#${entry.conversationSeq}`),
  ];
}

/** One entry as a row; sync entries (`withConversation`) name their conversation too. */
function entryRow(entry, withConversation) {
  return h(
    "tr",
    {},
    h("td", { class: "seq" }, entry.sequence),
    withConversation ? h("td", { class: "conversation" }, conversationOf(entry)) : null,
    h("td", { class: "time", title: entry.timestamp }, when(entry.timestamp)),
    h("td", { class: "message" }, entry.message),
  );
}

function entriesTable(entries, withConversation = false) {
  if (!entries.length) return h("p", { class: "empty" }, "no entries");
  return h(
    "table",
    { class: "entries" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "seq"),
        withConversation ? h("th", {}, "conversation") : null,
        h("th", {}, "stored (UTC)"),
        h("th", {}, "message"),
      ),
    ),
    h("tbody", {}, entries.map((entry) => entryRow(entry, withConversation))),
  );
}

/** A field the page shows next to its value: "latestSeq 5". */
function figure(name, value, className) {
  return h("span", { class: className }, `${name} `, code(value));
}

// --- Forms ----------------------------------------------------------------------------------

/** Runs a form's action with its buttons held; a failure is shown in `out`. */
function handle(form, out, action) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await busy(form, out, action);
  });
}

async function busy(form, out, action) {
  const buttons = form.querySelectorAll("button");
  form.setAttribute("aria-busy", "true");
  for (const button of buttons) button.disabled = true;
  try {
    await action();
  } catch (failure) {
    out.append(errorBox(failure));
  } finally {
    form.removeAttribute("aria-busy");
    for (const button of buttons) button.disabled = false;
    refreshHistoryNext();
    refreshConversationsNext();
  }
}

const value = (form, name) => form.elements[name].value.trim();

/** `message` as go-timeline clients send it (a string holding JSON, which the service
    checks), or with batch checked `messages`, one per line; and client_msg_id if given. */
function messageFields(form) {
  const fields = {};
  const text = form.elements.message.value;
  if (form.elements.batch.checked) {
    fields.messages = text.split("\n").map((line) => line.trim()).filter(Boolean);
  } else {
    fields.message = text;
  }
  const clientMsgId = value(form, "client_msg_id");
  if (clientMsgId) fields.client_msg_id = clientMsgId;
  return fields;
}

function setUpSend() {
  const form = $("send-form");
  const out = $("send-result");
  handle(form, out, async () => {
    out.replaceChildren();
    const body = { from: value(form, "from"), to: value(form, "to"), ...messageFields(form) };
    const reply = await api("POST", "/timeline/send", body);
    const sequences = reply.sequences ? ` (the batch: ${reply.sequences.join(", ")})` : "";
    const summary = `stored: sequence ${reply.sequence} of ${body.to}'s sync timeline${sequences}`;
    out.append(replyBox(summary, reply));
    refreshConversations();
  });

  const group = $("group-form");
  const groupOut = $("group-result");
  handle(group, groupOut, async () => {
    groupOut.replaceChildren();
    const members = value(group, "group_members").split(/[\s,]+/).filter(Boolean);
    const body = { group_name: value(group, "group_name"), group_members: members, ...messageFields(group) };
    const sender = value(group, "from");
    if (sender) body.from = sender; // empty: none, as go-timeline sends it
    const reply = await api("POST", "/timeline/sendGroup", body);
    const failed = reply.failedMembers;
    const summary = failed.length
      ? `stored, except for ${failed.join(", ")}: send again with the same client_msg_id`
      : `stored for ${new Set(members).size} member(s); failedMembers is empty`;
    groupOut.append(replyBox(summary, reply));
    refreshConversations();
  });
}

// --- Sync and ack -------------------------------------------------------------------------

const positions = new Map(); // member and device -> the last_read that device reached here

/** The key of a member's device in `positions` (device "": the member as one device). */
const deviceKey = (member, device) => JSON.stringify([member, device]);

const isSeq = (text) => /^\d+$/.test(text);

function syncPage(number, lastRead, page, device) {
  const header = h(
    "header",
    {},
    h("b", {}, `page ${number}`),
    device ? figure("device", device, "device") : null,
    figure("last_read", lastRead, "last-read"),
    figure("latestSeq", page.latestSeq, "latest-seq"),
    figure("entrySetLastSeq", page.entrySetLastSeq, "entry-set-last-seq"),
    figure("minSeq", page.minSeq, "min-seq"),
    h("span", {}, `${page.entrySet.length} entries`),
  );
  let gap = null;
  if (isSeq(lastRead) && BigInt(lastRead) + 1n < BigInt(page.minSeq)) {
    const first = BigInt(lastRead) + 1n;
    const last = BigInt(page.minSeq) - 1n;
    const range = first === last ? `entry ${first} is` : `entries ${first} to ${last} are`;
    gap = h(
      "div",
      { class: "gap", role: "note" },
      h("strong", {}, "Missed entries. "),
      `last_read + 1 = ${first} is below minSeq ${page.minSeq}: ${range} no longer in this ` +
        "timeline (another device acked them, or they expired). A device in this state pages " +
        "its conversations' history instead.",
    );
  }
  return h("div", { class: "page" }, header, gap, entriesTable(page.entrySet, true));
}

async function sync(form, out) {
  out.replaceChildren();
  const member = value(form, "member");
  const device = value(form, "device");
  const count = value(form, "count");
  let lastRead = value(form, "last_read") || "0";
  for (let pages = 1; ; pages += 1) {
    const query = new URLSearchParams({ member, last_read: lastRead });
    if (count) query.set("count", count);
    if (device) query.set("device", device);
    const page = await api("GET", `/timeline/sync?${query}`);
    out.append(syncPage(pages, lastRead, page, device));
    const latest = BigInt(page.latestSeq);
    if (page.entrySet.length === 0) {
      out.append(
        BigInt(lastRead) >= latest
          ? h("p", { class: "done" }, `Up to date at ${lastRead}.`)
          : h(
              "p",
              { class: "waiting" },
              `latestSeq is ${page.latestSeq} but nothing after ${lastRead} can be read yet ` +
                "(a write still in flight, or a hole not yet sealed): a device pulls again later.",
            ),
      );
      break;
    }
    lastRead = page.entrySetLastSeq;
    positions.set(deviceKey(member, device), lastRead);
    form.elements.last_read.value = lastRead;
    $("ack-form").elements.seq.value = lastRead;
    if (BigInt(lastRead) >= latest) {
      out.append(h("p", { class: "done" }, `Up to date at ${lastRead}.`));
      break;
    }
    if (pages >= MAX_PAGES) {
      const stopped = `Stopped after ${MAX_PAGES} pages; Sync again goes on from ${lastRead}.`;
      out.append(h("p", { class: "waiting" }, stopped));
      break;
    }
  }
}

// --- Follow: one sync always waiting (wait_ms), entries appended as they come ---------------

let following = null; // {member, device, lastRead, count, controller} while following

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function followSays(text, state) {
  const status = $("follow-status");
  status.textContent = text;
  status.classList.toggle("live", state === "live");
  status.classList.toggle("stopped", state === "stopped");
}

/** Follows the sync form's member from its last_read: one sync with wait_ms outstanding at a
    time, each next one from the reply's entrySetLastSeq. */
function startFollow(form) {
  stopFollow();
  const member = value(form, "member");
  const state = {
    member,
    device: value(form, "device"),
    lastRead: value(form, "last_read") || "0",
    count: value(form, "count"),
    controller: new AbortController(),
  };
  following = state;
  form.elements.follow.checked = true;
  $("follow-result").hidden = false;
  $("follow-entries").tBodies[0].replaceChildren();
  $("follow-error").replaceChildren();
  follow(state, form);
}

/** Stops following: the waiting sync is aborted and the toggle turned off. */
function stopFollow(reason) {
  const state = following;
  if (state === null) return;
  following = null;
  state.controller.abort();
  $("sync-form").elements.follow.checked = false;
  followSays(reason || `Stopped following ${state.member} at ${state.lastRead}.`, "stopped");
}

async function follow(state, form) {
  let failures = 0;
  while (following === state) {
    followSays(`Following ${state.member}: waiting for entries after ${state.lastRead}…`, "live");
    const query = new URLSearchParams({
      member: state.member,
      last_read: state.lastRead,
      wait_ms: String(FOLLOW_WAIT_MS),
    });
    if (state.count) query.set("count", state.count);
    if (state.device) query.set("device", state.device);
    let page;
    try {
      page = await api("GET", `/timeline/sync?${query}`, undefined, {
        signal: state.controller.signal,
      });
    } catch (failure) {
      if (following !== state) return; // stopped: this was the abort
      $("follow-error").replaceChildren(errorBox(failure));
      if (failure instanceof ApiError && (failure.status === 0 || failure.status >= 500)) {
        failures += 1;
        const pause = Math.min(FOLLOW_RETRY_MS * 2 ** (failures - 1), 30000);
        followSays(`Following ${state.member}: asking again in ${pause / 1000} s…`, "live");
        await sleep(pause);
        continue;
      }
      stopFollow(`Stopped following ${state.member}: the service refused the sync.`);
      return;
    }
    if (following !== state) return;
    failures = 0;
    $("follow-error").replaceChildren();
    if (page.entrySet.length === 0) continue; // the wait ended with nothing new: wait again
    const rows = $("follow-entries").tBodies[0];
    for (const entry of page.entrySet) rows.append(entryRow(entry, true));
    while (rows.children.length > FOLLOW_ROWS_MAX) rows.firstElementChild.remove();
    if (BigInt(state.lastRead) + 1n < BigInt(page.minSeq)) {
      const first = BigInt(state.lastRead) + 1n;
      const last = BigInt(page.minSeq) - 1n;
      const range = first === last ? `Entry ${first} is` : `Entries ${first} to ${last} are`;
      $("follow-error").replaceChildren(
        h(
          "div",
          { class: "gap", role: "note" },
          h("strong", {}, "Missed entries. "),
          `${range} no longer in this timeline (another device acked them, or they expired).`,
        ),
      );
    }
    // The device's position moves on, as a Sync moves it.
    state.lastRead = page.entrySetLastSeq;
    positions.set(deviceKey(state.member, state.device), state.lastRead);
    form.elements.last_read.value = state.lastRead;
    $("ack-form").elements.seq.value = state.lastRead;
    // New entries: the member's conversations and devices (this one was seen) are read again.
    refreshConversations();
    listDevices();
  }
}

function setUpSync() {
  const form = $("sync-form");
  const out = $("sync-result");
  handle(form, out, async () => {
    stopFollow(); // the Sync moves the position itself
    await sync(form, out);
    // The sync may have changed both: read them again (not awaited: the Sync is done).
    refreshConversations();
    listDevices();
  });
  form.elements.follow.addEventListener("change", () => {
    if (form.elements.follow.checked) startFollow(form);
    else stopFollow();
  });
  // A hidden page (another tab, minimised, left) holds no request open.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) stopFollow("Stopped following: the page was hidden.");
  });
  window.addEventListener("pagehide", () => stopFollow("Stopped following: the page was left."));
  // Each member and device name is a device of its own here: switching shows where that one
  // got to. Another member's conversations and devices are listed at its next Sync.
  const switched = () => {
    stopFollow();
    const reached = positions.get(deviceKey(value(form, "member"), value(form, "device"))) || "0";
    form.elements.last_read.value = reached;
    $("ack-form").elements.seq.value = reached;
    $("ack-result").replaceChildren();
  };
  form.elements.member.addEventListener("input", () => {
    switched();
    clearMemberLists();
  });
  form.elements.device.addEventListener("input", () => {
    switched();
    markDevice();
  });
  $("devices-refresh").addEventListener("click", listDevices);

  const ack = $("ack-form");
  const ackOut = $("ack-result");
  handle(ack, ackOut, async () => {
    ackOut.replaceChildren();
    const member = value(form, "member");
    const device = value(form, "device");
    const seq = value(ack, "seq");
    // An empty seq is sent as null, for the service to say it is required.
    const body = { member, seq: seq === "" ? null : seq };
    if (device) body.device = device;
    const reply = await api("POST", "/timeline/ack", body);
    ackOut.append(
      h(
        "span",
        { class: "acked" },
        device
          ? `${member}'s device ${device} acked up to ${seq}; entries every device acked released; `
          : `${member}'s entries up to ${seq} released; `,
        figure("minSeq", reply.minSeq, "min-seq"),
        " (history and latestSeq are untouched)",
      ),
    );
    listDevices();
  });
}

// --- Conversations and devices of the sync member ------------------------------------------

/** The list shown: whose, from which cursor ("": the top) and the reply's `next`. Each read
    takes a new generation; a reply of an older one (another member's) is dropped. */
const listing = { member: "", before: "", next: "", generation: 0 };
const CONVERSATION_COLUMNS = [
  "type",
  "conversation",
  "last message",
  "at (UTC)",
  "latestSeq",
  "readSeq",
  "unread",
  "", // Mark read
];
let devicesGeneration = 0;

const syncMember = () => value($("sync-form"), "member");

/** A long message in a cell: the start of it, the whole in its title. */
function preview(text, max = 80) {
  const chars = Array.from(String(text));
  return chars.length > max ? `${chars.slice(0, max - 1).join("")}…` : chars.join("");
}

function refreshConversationsNext() {
  $("conversations-next").disabled = listing.next === "";
}

/** Another member was typed in: its lists are not read yet (nor is a reply to the last one
    shown). */
function clearMemberLists() {
  const member = syncMember() || "—";
  listing.generation += 1;
  devicesGeneration += 1;
  Object.assign(listing, { member: "", before: "", next: "" });
  refreshConversationsNext();
  $("conversations-member").textContent = member;
  $("devices-member").textContent = member;
  $("read-result").replaceChildren();
  $("conversations-result").replaceChildren(
    h("p", { class: "note" }, "Listed after a Sync or a send, or with Refresh."),
  );
  $("devices-result").replaceChildren(
    h("p", { class: "note" }, "Listed after a Sync or an Ack, or with Refresh."),
  );
}

/** Reads a page of the sync member's conversations (`before`: "" for the most recent) and
    shows it. A failure is shown in its place. */
async function listConversations(before) {
  const member = syncMember();
  const out = $("conversations-result");
  listing.generation += 1;
  const mine = listing.generation;
  $("conversations-member").textContent = member || "—";
  if (!member) {
    Object.assign(listing, { member: "", before: "", next: "" });
    refreshConversationsNext();
    out.replaceChildren(h("p", { class: "note" }, "No member: enter one in the sync form."));
    return;
  }
  const query = new URLSearchParams({ member });
  const count = value($("conversations-form"), "count");
  if (count) query.set("count", count);
  if (before) query.set("before", before);
  let reply;
  try {
    reply = await api("GET", `/timeline/conversations?${query}`);
  } catch (failure) {
    if (mine !== listing.generation) return;
    Object.assign(listing, { member: "", before: "", next: "" });
    refreshConversationsNext();
    out.replaceChildren(errorBox(failure));
    return;
  }
  if (mine !== listing.generation) return;
  Object.assign(listing, { member, before, next: reply.next });
  refreshConversationsNext();
  const list = reply.conversations;
  const header = h(
    "header",
    {},
    h("b", {}, before ? "further on" : "most recent first"),
    before ? figure("before", preview(before, 24), "before") : null,
    h("span", {}, `${list.length} conversation(s)`),
    h("span", { class: "hint" }, `read at ${new Date().toLocaleTimeString()}`),
  );
  const table = list.length
    ? h(
        "table",
        { class: "conversations" },
        h(
          "thead",
          {},
          h("tr", {}, CONVERSATION_COLUMNS.map((name) => h("th", {}, name))),
        ),
        h("tbody", {}, list.map((conversation) => conversationRow(member, conversation))),
      )
    : h("p", { class: "empty" }, "no conversations");
  out.replaceChildren(
    h("div", { class: "page" }, header, table),
    reply.next === "" ? h("p", { class: "done" }, "The end of the list.") : null,
  );
}

function conversationRow(member, conversation) {
  const last = conversation.lastMessage;
  const unread = Number(conversation.unread);
  const done = BigInt(conversation.readSeq) >= BigInt(conversation.latestSeq);
  const button = h("button", { type: "button", class: "quiet", disabled: done }, "Mark read");
  button.addEventListener("click", () => markRead(member, conversation, button));
  return h(
    "tr",
    {
      class: unread > 0 ? "has-unread" : "",
      "data-type": conversation.type,
      "data-conversation": conversation.conversation,
    },
    h("td", { class: "conv-type" }, conversation.type),
    h("td", { class: "conv-name" }, conversation.conversation),
    h("td", { class: "message", title: last ? last.message : "" }, last ? preview(last.message) : "—"),
    h("td", { class: "time", title: last ? last.timestamp : "" }, when(last && last.timestamp)),
    h("td", { class: "num conv-latest" }, conversation.latestSeq),
    h("td", { class: "num conv-read" }, conversation.readSeq),
    h("td", { class: "conv-unread" }, h("span", { class: unread ? "badge unread" : "badge" }, unread)),
    h("td", {}, button),
  );
}

/** POST /timeline/read up to the conversation's latestSeq, then the list is read again. */
async function markRead(member, conversation, button) {
  const out = $("read-result");
  out.replaceChildren();
  button.disabled = true;
  const body = {
    member,
    type: conversation.type,
    conversation: conversation.conversation,
    seq: conversation.latestSeq,
  };
  try {
    const reply = await api("POST", "/timeline/read", body);
    out.append(
      h(
        "span",
        { class: "marked" },
        `${member} read ${conversation.type} ${conversation.conversation} up to ` +
          `${conversation.latestSeq}: `,
        figure("readSeq", reply.readSeq, "read-seq"),
        " ",
        figure("unread", String(reply.unread), "unread"),
      ),
    );
  } catch (failure) {
    out.append(errorBox(failure));
    button.disabled = false;
    return;
  }
  await listConversations(listing.member === member ? listing.before : ""); // the page shown
}

/** Lists the sync member's conversations again from the most recent: new entries move theirs
    to the top. Not awaited by its callers; it shows its own failure. */
function refreshConversations() {
  if (syncMember()) listConversations("");
}

/** Reads the sync member's devices: each one's acked position and when it was last seen. */
async function listDevices() {
  const member = syncMember();
  const out = $("devices-result");
  devicesGeneration += 1;
  const mine = devicesGeneration;
  $("devices-member").textContent = member || "—";
  if (!member) {
    out.replaceChildren(h("p", { class: "note" }, "No member: enter one in the sync form."));
    return;
  }
  let reply;
  try {
    reply = await api("GET", `/timeline/devices?${new URLSearchParams({ member })}`);
  } catch (failure) {
    if (mine === devicesGeneration) out.replaceChildren(errorBox(failure));
    return;
  }
  if (mine !== devicesGeneration) return;
  const devices = reply.devices;
  out.replaceChildren(
    devices.length
      ? h(
          "table",
          { class: "device-list" },
          h(
            "thead",
            {},
            h("tr", {}, ["device", "acked up to", "last seen (UTC)"].map((name) => h("th", {}, name))),
          ),
          h(
            "tbody",
            {},
            devices.map((device) =>
              h(
                "tr",
                { "data-device": device.device },
                h("td", { class: "device-name" }, device.device),
                h("td", { class: "num device-position" }, device.position),
                h("td", { class: "time", title: device.lastSeen }, when(device.lastSeen)),
              ),
            ),
          ),
        )
      : h(
          "p",
          { class: "empty" },
          "no devices: a sync or an ack with a device name makes one known",
        ),
  );
  markDevice();
}

/** The row of the device named in the sync form, if listed, is marked as this page's. */
function markDevice() {
  const device = value($("sync-form"), "device");
  for (const row of $("devices-result").querySelectorAll("tr[data-device]")) {
    row.classList.toggle("current", row.dataset.device === device);
  }
}

function setUpConversations() {
  const form = $("conversations-form");
  const out = $("conversations-result");
  handle(form, out, () => listConversations(""));
  $("conversations-next").addEventListener("click", () => {
    if (listing.next !== "") busy(form, out, () => listConversations(listing.next));
  });
}

// --- History --------------------------------------------------------------------------------

let historyNext = null; // where the next page starts (last_read or before), or null: none

function historyPath(form) {
  const id = (name) => encodeURIComponent(value(form, name));
  return form.elements.kind.value === "group"
    ? `/timeline/history/group/${id("group")}`
    : `/timeline/history/single/${id("from")}/${id("to")}`;
}

async function readHistory(form, out, position) {
  out.replaceChildren();
  historyNext = null;
  const backward = form.elements.direction.value === "backward";
  const query = new URLSearchParams();
  const count = value(form, "count");
  if (count) query.set("count", count);
  if (backward) {
    query.set("direction", "backward");
    if (position && position !== "0") query.set("before", position);
  } else {
    query.set("last_read", position || "0");
  }
  form.elements.position.value = position || "0";
  const reply = await api("GET", `${historyPath(form)}?${query}`);
  const entries = reply.entrySet;
  if (backward) historyNext = reply.nextBefore !== "0" ? reply.nextBefore : null;
  else historyNext = entries.length ? entries[entries.length - 1].sequence : null;
  const header = h(
    "header",
    {},
    h("b", {}, backward ? "newest first" : "oldest first"),
    figure(backward ? "before" : "last_read", position || "0", "position"),
    backward ? figure("nextBefore", reply.nextBefore, "next-before") : null,
    h("span", {}, `${entries.length} entries`),
  );
  out.append(h("div", { class: "page" }, header, entriesTable(entries)));
  if (backward && reply.nextBefore === "0") out.append(h("p", { class: "done" }, "Nothing older."));
}

function refreshHistoryNext() {
  $("history-next").disabled = historyNext === null;
}

function setUpHistory() {
  const form = $("history-form");
  const out = $("history-result");
  const next = $("history-next");
  const showKind = () => {
    for (const label of form.querySelectorAll("[data-kind]")) {
      label.hidden = label.dataset.kind !== form.elements.kind.value;
    }
  };
  const showDirection = () => {
    const backward = form.elements.direction.value === "backward";
    $("history-position-name").textContent = backward ? "before" : "last_read";
    $("history-position-hint").textContent = backward ? "0: from the newest" : "0: from the oldest";
    next.textContent = backward ? "Older page" : "Next page";
  };
  const reset = () => {
    historyNext = null;
    form.elements.position.value = "0";
    refreshHistoryNext();
  };
  form.elements.kind.addEventListener("change", () => {
    showKind();
    reset();
  });
  form.elements.direction.addEventListener("change", () => {
    showDirection();
    reset();
  });
  handle(form, out, () => readHistory(form, out, value(form, "position")));
  next.addEventListener("click", () => {
    const position = historyNext;
    if (position !== null) busy(form, out, () => readHistory(form, out, position));
  });
  showKind();
  showDirection();
}

// --- The service: /readyz and /metrics -----------------------------------------------------

/** Prometheus' text format as samples: {name, labels, value}. */
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const [, name, raw] of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[name] = raw.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    const infinite = { "+Inf": Infinity, "-Inf": -Infinity };
    samples.push({ name: match[1], labels, value: infinite[match[3]] ?? Number(match[3]) });
  }
  return samples;
}

function total(samples, name, labels = {}) {
  return samples
    .filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
    .reduce((sum, s) => sum + s.value, 0);
}

const number = (n) =>
  Number.isFinite(n) ? n.toLocaleString("en-US", { maximumFractionDigits: 1 }) : "—";
const both = (...values) => values.map((n) => number(n)).join(" / ");

let previous = null; // {requests, at}: for the rate since the last refresh

function figures(samples) {
  const requests = total(samples, "timeline_http_request_duration_seconds_count");
  const at = performance.now();
  const rate = previous ? ((requests - previous.requests) * 1000) / (at - previous.at) : NaN;
  previous = { requests, at };
  const messages = total(samples, "timeline_fan_out_recipients_count");
  const recipients = total(samples, "timeline_fan_out_recipients_sum");
  // The largest fan-out, as the histogram knows it: the first bucket holding every message.
  const buckets = samples
    .filter((s) => s.name === "timeline_fan_out_recipients_bucket")
    .sort((a, b) => Number(a.labels.le) - Number(b.labels.le));
  const full = buckets.find((s) => s.value >= messages);
  let largest = "—";
  if (messages && full && full.labels.le !== "+Inf") largest = `≤ ${number(Number(full.labels.le))}`;
  else if (messages) largest = "over the last bucket";
  const repairs = (repair) => total(samples, "timeline_sequence_repairs_total", { repair });
  const written = (kind) => total(samples, "timeline_messages_written_total", { kind });
  const dependency = (name) => total(samples, "timeline_dependency_errors_total", { dependency: name });
  return [
    ["requests", number(requests), "requests"],
    ["requests/s since the last refresh", number(rate), "rate"],
    ["messages sent", number(messages), "messages"],
    ["sync copies per message (mean)", messages ? number(recipients / messages) : "—", "fan-out-mean"],
    ["largest fan-out", largest, "fan-out-max"],
    ["documents written: history / sync", both(written("history"), written("sync")), "written"],
    ["failedMembers reported", number(total(samples, "timeline_failed_members_total")), "failed"],
    [
      "repairs: seeded / moved / restored",
      both(repairs("seeded"), repairs("moved"), repairs("restored")),
      "repairs",
    ],
    ["acks", number(total(samples, "timeline_acks_total")), "acks"],
    ["expired entries removed", number(total(samples, "timeline_expired_removed_total")), "expired"],
    [
      "dependency errors: redis / store",
      both(dependency("redis"), dependency("store")),
      "dependency-errors",
    ],
  ];
}

function routes(samples) {
  const byRoute = new Map();
  for (const s of samples) {
    if (s.name !== "timeline_http_request_duration_seconds_count") continue;
    const key = `${s.labels.method} ${s.labels.route}`;
    const row = byRoute.get(key) || { requests: 0, errors: 0 };
    row.requests += s.value;
    if (Number(s.labels.status) >= 400) row.errors += s.value;
    byRoute.set(key, row);
  }
  return [...byRoute].sort((a, b) => b[1].requests - a[1].requests);
}

function showHealth(checks, ready, summary) {
  const pill = $("health");
  pill.textContent = summary;
  pill.classList.toggle("ready", ready);
  pill.classList.toggle("down", !ready);
  $("service-checks").replaceChildren(
    ...Object.entries(checks).map(([name, state]) =>
      h(
        "span",
        { class: state === "ok" || state === "ready" ? "check-ok" : "check-bad" },
        `${name}: ${state}`,
      ),
    ),
  );
}

let refreshing = false;

async function refreshService() {
  if (refreshing) return;
  refreshing = true;
  try {
    try {
      const ready = await api("GET", "/readyz", undefined, { quiet: true });
      showHealth(ready.checks, true, "ready");
    } catch (failure) {
      const envelope =
        failure instanceof ApiError ? failure.envelope : { metadata: {}, message: String(failure) };
      const summary = failure.status ? `not ready: ${envelope.message}` : "unreachable";
      showHealth(envelope.metadata || {}, false, summary);
    }
    try {
      const reply = await fetch("/metrics", { cache: "no-store" });
      if (!reply.ok) throw new Error(`/metrics answered ${reply.status}`);
      const samples = parseMetrics(await reply.text());
      $("figures").tBodies[0].replaceChildren(
        ...figures(samples).map(([name, shown, key]) =>
          h("tr", { "data-figure": key }, h("td", {}, name), h("td", {}, shown)),
        ),
      );
      $("routes").tBodies[0].replaceChildren(
        ...routes(samples).map(([route, row]) =>
          h(
            "tr",
            {},
            h("td", { class: "mono" }, route),
            h("td", {}, number(row.requests)),
            h("td", {}, number(row.errors)),
          ),
        ),
      );
      $("service-updated").textContent = `read at ${new Date().toLocaleTimeString()}`;
    } catch (failure) {
      $("service-updated").textContent = `metrics unavailable: ${failure.message}`;
    }
  } finally {
    refreshing = false;
  }
}

// --- The token --------------------------------------------------------------------------------

let tokenWaiters = [];
let tokenGiven = false;

/** Opens the token dialog; resolves true once a token is given, false if it is not. */
function askToken(reason) {
  $("token-reason").textContent = reason || "";
  $("token-input").value = "";
  const dialog = $("token-dialog");
  if (!dialog.open) {
    tokenGiven = false;
    dialog.showModal();
  }
  return new Promise((resolve) => tokenWaiters.push(resolve));
}

function showTokenState() {
  $("token-button").textContent = sessionStorage.getItem(TOKEN_KEY) ? "Token: set" : "Token";
}

function setUpToken() {
  const dialog = $("token-dialog");
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token-input").value.trim();
    if (!token) {
      $("token-reason").textContent = "Enter a token, or Cancel.";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    tokenGiven = true;
    dialog.close();
  });
  $("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    dialog.close();
  });
  $("token-cancel").addEventListener("click", () => dialog.close());
  // Closed by a button or by Escape: whoever waits learns whether a token was given.
  dialog.addEventListener("close", () => {
    const waiters = tokenWaiters;
    tokenWaiters = [];
    for (const resolve of waiters) resolve(tokenGiven);
    showTokenState();
  });
  $("token-button").addEventListener("click", () => askToken(""));
  showTokenState();
}

// --- Start ------------------------------------------------------------------------------------

setUpToken();
setUpSend();
setUpSync();
setUpConversations();
setUpHistory();
$("service-refresh").addEventListener("click", refreshService);
refreshService();
setInterval(() => {
  if (!document.hidden) refreshService();
}, REFRESH_MS);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refreshService();
});
