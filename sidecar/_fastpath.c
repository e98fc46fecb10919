/*
 * The compiled ingest path.
 *
 * BatchDecoder splits a serialized EventBatch into its events and validates
 * each one, without building protobuf objects; append_rows builds the LMDB
 * rows the writer appends for a batch (sidecar/store/_writer.py). Both run
 * with the GIL held, and every microsecond of Python they save on the main
 * thread is also one the writer thread does not wait for.
 *
 * Contract (sidecar/ingest/_decode.py is the caller, sidecar/ingest/_validate.py
 * the reference): for every event it either accepts it, returning the event
 * id and the event's bytes exactly as the client sent them, or rejects it
 * with the reason EventValidator would give, or, for any encoding this code
 * does not handle itself (a singular field sent twice, both oneof members,
 * unpacked or split logprobs, groups, non-canonical varints, several bad
 * attributes whose report order depends on the map), marks it "slow": the
 * caller then parses that one event with upb and runs EventValidator.
 * Every string field it accepts is checked to be valid UTF-8, as upb would
 * at parse time; an event that could not be parsed is rejected alone.
 *
 * Every read is bounds-checked against the end of the enclosing field; the
 * input is never written and nothing is allocated per field.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ENUM_VALUES 64
#define MAX_ATTRS 64

typedef enum { ST_OK = 0, ST_SLOW, ST_BAD, ST_UTF8 } status_t;

typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
} span_t;

typedef struct {
    span_t key, value;
} attr_t;

typedef struct {
    span_t event_id;
    int kind; /* 0: no payload, 10: inference, 11: feedback */
    /* inference */
    span_t model_version, prompt, response, error_code, retry_of, logprobs;
    int32_t role;
    double latency;
    /* feedback */
    int has_rating;
    float rating;
    int32_t signal;
    span_t correction;
    /* both */
    span_t request_id, session_id, user_id;
    int n_attrs;
    const char *bad_utf8; /* the field with invalid UTF-8 (ST_UTF8) */
    const uint8_t *bad_at; /* where a malformed field starts (ST_BAD) */
} event_t;

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_id, max_text, max_attrs, max_key, max_value, max_logprobs;
    int n_roles, n_signals;
    int32_t roles[MAX_ENUM_VALUES];
    int32_t signals[MAX_ENUM_VALUES];
} DecoderObject;

/* -- wire format ---------------------------------------------------------- */

/* Canonical varints only: padded ones (a trailing 0x00 byte) and 10-byte ones
 * whose last byte carries more than bit 63 are left to upb. */
static inline status_t
rd_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    if (p < end && *p < 0x80) { /* one byte: tags, lengths and enums, mostly */
        *out = *p;
        *pp = p + 1;
        return ST_OK;
    }
    for (int i = 0; i < 10; i++) {
        if (p >= end)
            return ST_BAD;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            if (i > 0 && b == 0)
                return ST_SLOW;
            if (i == 9 && b > 1)
                return ST_SLOW;
            *pp = p;
            *out = v;
            return ST_OK;
        }
    }
    return ST_SLOW;
}

static status_t
rd_tag(const uint8_t **pp, const uint8_t *end, uint32_t *field, int *wt)
{
    uint64_t v;
    status_t s = rd_varint(pp, end, &v);
    if (s != ST_OK)
        return s;
    if (v > UINT32_MAX || (v >> 3) == 0)
        return ST_SLOW;
    *field = (uint32_t)(v >> 3);
    *wt = (int)(v & 7);
    return ST_OK;
}

static status_t
rd_len(const uint8_t **pp, const uint8_t *end, span_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v;
    status_t s = rd_varint(&p, end, &v);
    if (s != ST_OK)
        return s;
    if (v > (uint64_t)(end - p))
        return ST_BAD;
    out->p = p;
    out->n = (Py_ssize_t)v;
    *pp = p + v;
    return ST_OK;
}

static status_t
skip_field(int wt, const uint8_t **pp, const uint8_t *end)
{
    uint64_t v;
    span_t s;
    switch (wt) {
    case 0:
        return rd_varint(pp, end, &v);
    case 1:
        if (end - *pp < 8)
            return ST_BAD;
        *pp += 8;
        return ST_OK;
    case 2:
        return rd_len(pp, end, &s);
    case 5:
        if (end - *pp < 4)
            return ST_BAD;
        *pp += 4;
        return ST_OK;
    default: /* groups, and wire types 6 and 7: upb decides */
        return ST_SLOW;
    }
}

static uint32_t
le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static float
le_float(const uint8_t *p)
{
    uint32_t u = le32(p);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static double
le_double(const uint8_t *p)
{
    uint64_t u = (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF):
 * what upb accepts in a proto3 string field. */
static int
utf8_valid(const uint8_t *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (w & 0x8080808080808080ULL)
                break;
            i += 8;
        }
        if (i >= n)
            break;
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
        }
        else if (c < 0xC2) {
            return 0;
        }
        else if (c < 0xE0) {
            if (n - i < 2 || (s[i + 1] & 0xC0) != 0x80)
                return 0;
            i += 2;
        }
        else if (c < 0xF0) {
            if (n - i < 3)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80)
                return 0;
            if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F))
                return 0;
            i += 3;
        }
        else if (c < 0xF5) {
            if (n - i < 4)
                return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80)
                return 0;
            if ((c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F))
                return 0;
            i += 4;
        }
        else {
            return 0;
        }
    }
    return 1;
}

/* -- one event ------------------------------------------------------------ */

/* A singular string field: once only, length-delimited, valid UTF-8. */
static status_t
take_string(const uint8_t **pp, const uint8_t *end, int wt, uint32_t *seen, int bit,
            span_t *out, const char *name, event_t *ev)
{
    if (wt != 2 || (*seen & (1u << bit)))
        return ST_SLOW;
    *seen |= 1u << bit;
    status_t s = rd_len(pp, end, out);
    if (s != ST_OK)
        return s;
    if (!utf8_valid(out->p, out->n)) {
        ev->bad_utf8 = name;
        return ST_UTF8;
    }
    return ST_OK;
}

/* A singular enum (open, int32): once only, a varint truncated to 32 bits. */
static status_t
take_enum(const uint8_t **pp, const uint8_t *end, int wt, uint32_t *seen, int bit, int32_t *out)
{
    uint64_t v;
    if (wt != 0 || (*seen & (1u << bit)))
        return ST_SLOW;
    *seen |= 1u << bit;
    status_t s = rd_varint(pp, end, &v);
    if (s == ST_OK)
        *out = (int32_t)(uint32_t)v;
    return s;
}

/* A singular scalar we do not validate (a bool, a uint32): once only. */
static status_t
take_varint(const uint8_t **pp, const uint8_t *end, int wt, uint32_t *seen, int bit)
{
    uint64_t v;
    if (wt != 0 || (*seen & (1u << bit)))
        return ST_SLOW;
    *seen |= 1u << bit;
    return rd_varint(pp, end, &v);
}

/* A map<string, string> entry: key = 1, value = 2, nothing else. */
static status_t
take_attribute(const uint8_t **pp, const uint8_t *end, int wt, attr_t *attrs, event_t *ev,
               const char *name)
{
    span_t entry;
    if (wt != 2 || ev->n_attrs >= MAX_ATTRS)
        return ST_SLOW;
    status_t s = rd_len(pp, end, &entry);
    if (s != ST_OK)
        return s;
    attr_t *a = &attrs[ev->n_attrs++];
    a->key.p = a->value.p = entry.p;
    a->key.n = a->value.n = 0;
    const uint8_t *p = entry.p, *e = entry.p + entry.n;
    uint32_t seen = 0;
    while (p < e) {
        uint32_t field;
        int fwt;
        const uint8_t *start = p;
        s = rd_tag(&p, e, &field, &fwt);
        if (s == ST_OK) {
            if (field == 1)
                s = take_string(&p, e, fwt, &seen, 1, &a->key, name, ev);
            else if (field == 2)
                s = take_string(&p, e, fwt, &seen, 2, &a->value, name, ev);
            else
                s = ST_SLOW;
        }
        if (s != ST_OK) {
            if (s == ST_BAD)
                ev->bad_at = start;
            return s;
        }
    }
    return ST_OK;
}

static status_t
walk_timestamp(const uint8_t *p, const uint8_t *end, event_t *ev)
{
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *start = p;
        status_t s = rd_tag(&p, end, &field, &wt);
        if (s == ST_OK)
            s = (field == 1 || field == 2) && wt != 0 ? ST_SLOW : skip_field(wt, &p, end);
        if (s != ST_OK) {
            if (s == ST_BAD)
                ev->bad_at = start;
            return s;
        }
    }
    return ST_OK;
}

static status_t
parse_inference(const uint8_t *p, const uint8_t *end, event_t *ev, attr_t *attrs)
{
    uint32_t seen = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *start = p;
        status_t s = rd_tag(&p, end, &field, &wt);
        if (s != ST_OK)
            goto fail;
        switch (field) {
        case 1:
            s = take_string(&p, end, wt, &seen, 1, &ev->request_id, "inference.request_id", ev);
            break;
        case 2:
            s = take_string(&p, end, wt, &seen, 2, &ev->model_version, "inference.model_version",
                            ev);
            break;
        case 3:
            s = take_enum(&p, end, wt, &seen, 3, &ev->role);
            break;
        case 4:
            s = take_string(&p, end, wt, &seen, 4, &ev->prompt, "inference.prompt", ev);
            break;
        case 5:
            s = take_string(&p, end, wt, &seen, 5, &ev->response, "inference.response", ev);
            break;
        case 6:
            if (wt != 1 || (seen & (1u << 6))) {
                s = ST_SLOW;
                break;
            }
            seen |= 1u << 6;
            if (end - p < 8) {
                s = ST_BAD;
                break;
            }
            ev->latency = le_double(p);
            p += 8;
            break;
        case 7:
            s = take_varint(&p, end, wt, &seen, 7);
            break;
        case 8:
            s = take_string(&p, end, wt, &seen, 8, &ev->error_code, "inference.error_code", ev);
            break;
        case 9: /* packed floats, in one piece */
            if (wt != 2 || (seen & (1u << 9))) {
                s = ST_SLOW;
                break;
            }
            seen |= 1u << 9;
            s = rd_len(&p, end, &ev->logprobs);
            if (s == ST_OK && ev->logprobs.n % 4 != 0)
                s = ST_SLOW;
            break;
        case 10:
            s = take_string(&p, end, wt, &seen, 10, &ev->session_id, "inference.session_id", ev);
            break;
        case 11:
            s = take_string(&p, end, wt, &seen, 11, &ev->user_id, "inference.user_id", ev);
            break;
        case 12:
            s = take_string(&p, end, wt, &seen, 12, &ev->retry_of, "inference.retry_of", ev);
            break;
        case 13:
            s = take_attribute(&p, end, wt, attrs, ev, "inference.attributes");
            break;
        default:
            s = skip_field(wt, &p, end);
        }
        if (s != ST_OK)
            goto fail;
        continue;
    fail:
        if (s == ST_BAD && ev->bad_at == NULL)
            ev->bad_at = start;
        return s;
    }
    return ST_OK;
}

static status_t
parse_feedback(const uint8_t *p, const uint8_t *end, event_t *ev, attr_t *attrs)
{
    uint32_t seen = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *start = p;
        status_t s = rd_tag(&p, end, &field, &wt);
        if (s != ST_OK)
            goto fail;
        switch (field) {
        case 1:
            s = take_string(&p, end, wt, &seen, 1, &ev->request_id, "feedback.request_id", ev);
            break;
        case 2:
            if (wt != 5 || (seen & (1u << 2))) {
                s = ST_SLOW;
                break;
            }
            seen |= 1u << 2;
            if (end - p < 4) {
                s = ST_BAD;
                break;
            }
            ev->has_rating = 1;
            ev->rating = le_float(p);
            p += 4;
            break;
        case 3:
            s = take_enum(&p, end, wt, &seen, 3, &ev->signal);
            break;
        case 4:
            s = take_varint(&p, end, wt, &seen, 4);
            break;
        case 5:
            s = take_string(&p, end, wt, &seen, 5, &ev->correction, "feedback.correction", ev);
            break;
        case 6:
            s = take_attribute(&p, end, wt, attrs, ev, "feedback.attributes");
            break;
        case 7:
            s = take_string(&p, end, wt, &seen, 7, &ev->user_id, "feedback.user_id", ev);
            break;
        case 8:
            s = take_string(&p, end, wt, &seen, 8, &ev->session_id, "feedback.session_id", ev);
            break;
        default:
            s = skip_field(wt, &p, end);
        }
        if (s != ST_OK)
            goto fail;
        continue;
    fail:
        if (s == ST_BAD && ev->bad_at == NULL)
            ev->bad_at = start;
        return s;
    }
    return ST_OK;
}

static status_t
parse_event(const uint8_t *p, const uint8_t *end, event_t *ev, attr_t *attrs)
{
    uint32_t seen = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        span_t sub;
        const uint8_t *start = p;
        status_t s = rd_tag(&p, end, &field, &wt);
        if (s != ST_OK)
            goto fail;
        switch (field) {
        case 1:
            s = take_string(&p, end, wt, &seen, 1, &ev->event_id, "event_id", ev);
            break;
        case 2:
            if (wt != 2 || (seen & (1u << 2))) {
                s = ST_SLOW;
                break;
            }
            seen |= 1u << 2;
            s = rd_len(&p, end, &sub);
            if (s == ST_OK)
                s = walk_timestamp(sub.p, sub.p + sub.n, ev);
            break;
        case 10:
        case 11: /* the payload oneof: one member, once */
            if (wt != 2 || ev->kind != 0) {
                s = ST_SLOW;
                break;
            }
            ev->kind = (int)field;
            s = rd_len(&p, end, &sub);
            if (s == ST_OK)
                s = field == 10 ? parse_inference(sub.p, sub.p + sub.n, ev, attrs)
                                : parse_feedback(sub.p, sub.p + sub.n, ev, attrs);
            break;
        default:
            s = skip_field(wt, &p, end);
        }
        if (s != ST_OK)
            goto fail;
        continue;
    fail:
        if (s == ST_BAD && ev->bad_at == NULL)
            ev->bad_at = start;
        return s;
    }
    return ST_OK;
}

/* -- validation (mirrors EventValidator.check, in its order) -------------- */

typedef enum { V_ACCEPT = 0, V_REJECT, V_SLOW, V_ERROR } verdict_t;

static int
known(const int32_t *values, int n, int32_t v)
{
    for (int i = 0; i < n; i++)
        if (values[i] == v)
            return 1;
    return 0;
}

/* "<prefix>, got <repr(x)>", or the logprob reason for index >= 0: the
 * number as Python's repr writes it. */
static PyObject *
reason_got(const char *prefix, Py_ssize_t index, double x)
{
    char *text = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return NULL;
    PyObject *out =
        index < 0
            ? PyUnicode_FromFormat("%s, got %s", prefix, text)
            : PyUnicode_FromFormat(
                  "inference.token_logprobs[%zd]: must be a finite number <= 0, got %s", index,
                  text);
    PyMem_Free(text);
    return out;
}

static verdict_t
check_ids(DecoderObject *d, const char *prefix, const span_t *const *values,
          const char *const *names, int n, PyObject **reason)
{
    for (int i = 0; i < n; i++) {
        if (values[i]->n > d->max_id) {
            *reason = PyUnicode_FromFormat("%s.%s: longer than %zd bytes", prefix, names[i],
                                           d->max_id);
            return *reason ? V_REJECT : V_ERROR;
        }
    }
    return V_ACCEPT;
}

static verdict_t
check_attributes(DecoderObject *d, const event_t *ev, const attr_t *attrs, const char *field,
                 PyObject **reason)
{
    int n = ev->n_attrs, bad = -1;
    for (int i = 1; i < n; i++) /* a repeated key: the map keeps the last, upb decides */
        for (int j = 0; j < i; j++)
            if (attrs[i].key.n == attrs[j].key.n &&
                memcmp(attrs[i].key.p, attrs[j].key.p, (size_t)attrs[i].key.n) == 0)
                return V_SLOW;
    if (n > d->max_attrs) {
        *reason = PyUnicode_FromFormat("%s: more than %zd entries", field, d->max_attrs);
        return *reason ? V_REJECT : V_ERROR;
    }
    for (int i = 0; i < n; i++) {
        if (attrs[i].key.n > d->max_key || attrs[i].value.n > d->max_value) {
            if (bad >= 0) /* which one is reported depends on the map's order */
                return V_SLOW;
            bad = i;
        }
    }
    if (bad < 0)
        return V_ACCEPT;
    const attr_t *a = &attrs[bad];
    if (a->key.n > d->max_key) {
        *reason = PyUnicode_FromFormat("%s: key longer than %zd bytes", field, d->max_key);
        return *reason ? V_REJECT : V_ERROR;
    }
    PyObject *key = PyUnicode_DecodeUTF8((const char *)a->key.p, a->key.n, "strict");
    if (key == NULL)
        return V_ERROR;
    *reason = PyUnicode_FromFormat("%s[%R]: value longer than %zd bytes", field, key,
                                   d->max_value);
    Py_DECREF(key);
    return *reason ? V_REJECT : V_ERROR;
}

static verdict_t
check_inference(DecoderObject *d, const event_t *ev, const attr_t *attrs, PyObject **reason)
{
    static const char *const names[] = {"request_id", "model_version", "error_code",
                                        "session_id", "user_id",       "retry_of"};
    const char *msg = NULL;
    if (ev->request_id.n == 0)
        msg = "inference.request_id: required";
    else if (ev->model_version.n == 0)
        msg = "inference.model_version: required";
    if (msg != NULL) {
        *reason = PyUnicode_FromString(msg);
        return *reason ? V_REJECT : V_ERROR;
    }
    const span_t *ids[] = {&ev->request_id, &ev->model_version, &ev->error_code,
                           &ev->session_id, &ev->user_id,       &ev->retry_of};
    verdict_t v = check_ids(d, "inference", ids, names, 6, reason);
    if (v != V_ACCEPT)
        return v;
    if (!known(d->roles, d->n_roles, ev->role)) {
        *reason = PyUnicode_FromFormat("inference.role: unknown enum value %d", (int)ev->role);
        return *reason ? V_REJECT : V_ERROR;
    }
    if (!(0.0 <= ev->latency && ev->latency < INFINITY)) {
        *reason = reason_got("inference.latency_ms: must be a finite number >= 0", -1,
                             ev->latency);
        return *reason ? V_REJECT : V_ERROR;
    }
    if (ev->prompt.n > d->max_text || ev->response.n > d->max_text) {
        const char *name = ev->prompt.n > d->max_text ? "prompt" : "response";
        *reason = PyUnicode_FromFormat("inference.%s: longer than %zd bytes", name, d->max_text);
        return *reason ? V_REJECT : V_ERROR;
    }
    Py_ssize_t n = ev->logprobs.n / 4;
    if (n > 0) {
        if (n > d->max_logprobs) {
            *reason = PyUnicode_FromFormat("inference.token_logprobs: more than %zd values",
                                           d->max_logprobs);
            return *reason ? V_REJECT : V_ERROR;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            double x = (double)le_float(ev->logprobs.p + 4 * i);
            if (!(-INFINITY < x && x <= 0.0)) {
                *reason = reason_got(NULL, i, x);
                return *reason ? V_REJECT : V_ERROR;
            }
        }
    }
    if (ev->n_attrs)
        return check_attributes(d, ev, attrs, "inference.attributes", reason);
    return V_ACCEPT;
}

static verdict_t
check_feedback(DecoderObject *d, const event_t *ev, const attr_t *attrs, PyObject **reason)
{
    static const char *const names[] = {"request_id", "user_id", "session_id"};
    if (ev->request_id.n == 0) {
        *reason = PyUnicode_FromString("feedback.request_id: required");
        return *reason ? V_REJECT : V_ERROR;
    }
    const span_t *ids[] = {&ev->request_id, &ev->user_id, &ev->session_id};
    verdict_t v = check_ids(d, "feedback", ids, names, 3, reason);
    if (v != V_ACCEPT)
        return v;
    if (ev->has_rating) {
        double r = (double)ev->rating;
        if (!(0.0 <= r && r <= 1.0)) {
            *reason = reason_got("feedback.rating: must be within [0, 1]", -1, r);
            return *reason ? V_REJECT : V_ERROR;
        }
    }
    if (!known(d->signals, d->n_signals, ev->signal)) {
        *reason =
            PyUnicode_FromFormat("feedback.signal: unknown enum value %d", (int)ev->signal);
        return *reason ? V_REJECT : V_ERROR;
    }
    if (ev->correction.n > d->max_text) {
        *reason = PyUnicode_FromFormat("feedback.correction: longer than %zd bytes", d->max_text);
        return *reason ? V_REJECT : V_ERROR;
    }
    if (ev->n_attrs)
        return check_attributes(d, ev, attrs, "feedback.attributes", reason);
    return V_ACCEPT;
}

static verdict_t
check_event(DecoderObject *d, const event_t *ev, const attr_t *attrs, PyObject **reason)
{
    const char *msg = NULL;
    if (ev->event_id.n == 0)
        msg = "event_id: required";
    else if (ev->event_id.n > d->max_id) {
        *reason = PyUnicode_FromFormat("event_id: longer than %zd bytes", d->max_id);
        return *reason ? V_REJECT : V_ERROR;
    }
    else if (ev->kind == 10)
        return check_inference(d, ev, attrs, reason);
    else if (ev->kind == 11)
        return check_feedback(d, ev, attrs, reason);
    else
        msg = "payload: one of inference or feedback is required";
    *reason = PyUnicode_FromString(msg);
    return *reason ? V_REJECT : V_ERROR;
}

/* -- the batch ------------------------------------------------------------ */

static int
append_pair(PyObject *list, PyObject *a, PyObject *b)
{
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return -1;
    }
    PyObject *t = PyTuple_Pack(2, a, b);
    Py_DECREF(a);
    Py_DECREF(b);
    if (t == NULL)
        return -1;
    int rc = PyList_Append(list, t);
    Py_DECREF(t);
    return rc;
}

static PyObject *
malformed(const uint8_t *base, const uint8_t *at, const char *what)
{
    PyErr_Format(PyExc_ValueError, "EventBatch: malformed at byte %zd: %s",
                 (Py_ssize_t)(at - base), what);
    return NULL;
}

PyDoc_STRVAR(decode_doc,
"decode(data: bytes) -> tuple[items, rejected, slow, count] | None\n\n"
"Splits and validates a serialized EventBatch. items: (event_id, event bytes)\n"
"for accepted events, in batch order, with (b'', event bytes) placeholders\n"
"for slow events; rejected: (index, reason); slow: (position in items,\n"
"index) of events the caller must parse and check itself; count: events in\n"
"the batch. None when the batch's own framing is unusual (the caller parses\n"
"it whole). Raises ValueError naming the byte offset when the batch's\n"
"framing is broken.");

static PyObject *
Decoder_decode(DecoderObject *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "decode() takes bytes");
        return NULL;
    }
    const uint8_t *base = (const uint8_t *)PyBytes_AS_STRING(arg);
    const uint8_t *p = base, *end = base + PyBytes_GET_SIZE(arg);
    PyObject *items = PyList_New(0), *rejected = PyList_New(0), *slow = PyList_New(0);
    PyObject *result = NULL;
    attr_t attrs[MAX_ATTRS];
    Py_ssize_t index = 0;
    if (items == NULL || rejected == NULL || slow == NULL)
        goto done;
    while (p < end) {
        uint32_t field;
        int wt;
        span_t es;
        const uint8_t *start = p;
        status_t s = rd_tag(&p, end, &field, &wt);
        if (s == ST_OK && field != 1) {
            s = skip_field(wt, &p, end);
            if (s == ST_OK)
                continue;
        }
        else if (s == ST_OK) {
            s = wt == 2 ? rd_len(&p, end, &es) : ST_SLOW;
        }
        if (s == ST_SLOW) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (s != ST_OK) {
            malformed(base, start, "a field runs past the end of the message");
            goto done;
        }

        event_t ev;
        memset(&ev, 0, sizeof ev);
        PyObject *reason = NULL;
        verdict_t v;
        s = parse_event(es.p, es.p + es.n, &ev, attrs);
        if (s == ST_OK)
            v = check_event(self, &ev, attrs, &reason);
        else if (s == ST_SLOW)
            v = V_SLOW;
        else {
            v = V_REJECT;
            reason = s == ST_UTF8
                         ? PyUnicode_FromFormat("%s: invalid UTF-8", ev.bad_utf8)
                         : PyUnicode_FromFormat(
                               "event: not a valid Event message (malformed field at byte %zd)",
                               (Py_ssize_t)(ev.bad_at - base));
            if (reason == NULL)
                v = V_ERROR;
        }
        switch (v) {
        case V_ACCEPT:
            if (append_pair(items,
                            PyBytes_FromStringAndSize((const char *)ev.event_id.p,
                                                      ev.event_id.n),
                            PyBytes_FromStringAndSize((const char *)es.p, es.n)) < 0)
                goto done;
            break;
        case V_REJECT:
            if (append_pair(rejected, PyLong_FromSsize_t(index), reason) < 0)
                goto done;
            break;
        case V_SLOW:
            if (append_pair(slow, PyLong_FromSsize_t(PyList_GET_SIZE(items)),
                            PyLong_FromSsize_t(index)) < 0)
                goto done;
            if (append_pair(items, PyBytes_FromStringAndSize(NULL, 0),
                            PyBytes_FromStringAndSize((const char *)es.p, es.n)) < 0)
                goto done;
            break;
        case V_ERROR:
            goto done;
        }
        index++;
    }
    result = Py_BuildValue("(OOOn)", items, rejected, slow, index);
done:
    Py_XDECREF(items);
    Py_XDECREF(rejected);
    Py_XDECREF(slow);
    return result;
}

/* -- counting events ------------------------------------------------------ */

/* Any varint protobuf accepts (padded ones too): counting must not miss an
 * event that upb would parse. */
static int
rd_any_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *pp = p;
            *out = v;
            return 0;
        }
    }
    return -1;
}

PyDoc_STRVAR(count_events_doc,
"count_events(data: bytes, limit: int) -> int\n\n"
"The events (field 1, length-delimited, outside any group) of a serialized\n"
"EventBatch, counted from the tags and lengths alone; it stops at limit + 1\n"
"and where the framing breaks (the decoder then reports the break).");

static PyObject *
count_events(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "y*n:count_events", &buf, &limit))
        return NULL;
    const uint8_t *p = (const uint8_t *)buf.buf, *end = p + buf.len;
    Py_ssize_t count = 0, depth = 0;
    while (p < end && count <= limit) {
        uint64_t tag, v;
        if (rd_any_varint(&p, end, &tag) < 0)
            break;
        int wt = (int)(tag & 7);
        if (wt == 0) {
            if (rd_any_varint(&p, end, &v) < 0)
                break;
        }
        else if (wt == 1 || wt == 5) {
            Py_ssize_t n = wt == 1 ? 8 : 4;
            if (end - p < n)
                break;
            p += n;
        }
        else if (wt == 2) {
            if (rd_any_varint(&p, end, &v) < 0 || v > (uint64_t)(end - p))
                break;
            p += v;
            if (depth == 0 && (tag >> 3) == 1)
                count++;
        }
        else if (wt == 3)
            depth++;
        else if (wt == 4 && depth > 0)
            depth--;
        else
            break;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(count);
}

/* -- the writer's rows --------------------------------------------------- */

static void
put_be64(char *out, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

PyDoc_STRVAR(append_rows_doc,
"append_rows(items, first_seq, now_ms) -> (id_rows, log_rows)\n\n"
"For items [(event_id, event bytes)], the dedupe rows\n"
"(event_id, u64be(seq) + u64be(now_ms)) and the log rows\n"
"(u64be(seq), u64be(now_ms) + event bytes), seq counting from first_seq.");

static PyObject *
append_rows(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *items;
    unsigned long long first, now;
    if (!PyArg_ParseTuple(args, "OKK:append_rows", &items, &first, &now))
        return NULL;
    PyObject *fast = PySequence_Fast(items, "items must be a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    PyObject *ids = PyList_New(n), *logs = PyList_New(n), *result = NULL;
    if (ids == NULL || logs == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2 ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1))) {
            PyErr_SetString(PyExc_TypeError, "items must be (bytes, bytes) tuples");
            goto done;
        }
        PyObject *eid = PyTuple_GET_ITEM(item, 0), *payload = PyTuple_GET_ITEM(item, 1);
        Py_ssize_t len = PyBytes_GET_SIZE(payload);
        uint64_t seq = (uint64_t)first + (uint64_t)i;
        PyObject *idval = PyBytes_FromStringAndSize(NULL, 16);
        PyObject *key = PyBytes_FromStringAndSize(NULL, 8);
        PyObject *logval = PyBytes_FromStringAndSize(NULL, 8 + len);
        if (idval == NULL || key == NULL || logval == NULL) {
            Py_XDECREF(idval);
            Py_XDECREF(key);
            Py_XDECREF(logval);
            goto done;
        }
        put_be64(PyBytes_AS_STRING(idval), seq);
        put_be64(PyBytes_AS_STRING(idval) + 8, now);
        put_be64(PyBytes_AS_STRING(key), seq);
        put_be64(PyBytes_AS_STRING(logval), now);
        memcpy(PyBytes_AS_STRING(logval) + 8, PyBytes_AS_STRING(payload), (size_t)len);
        Py_INCREF(eid);
        PyObject *idrow = PyTuple_New(2), *logrow = PyTuple_New(2);
        if (idrow == NULL || logrow == NULL) {
            Py_DECREF(eid);
            Py_DECREF(idval);
            Py_DECREF(key);
            Py_DECREF(logval);
            Py_XDECREF(idrow);
            Py_XDECREF(logrow);
            goto done;
        }
        PyTuple_SET_ITEM(idrow, 0, eid);
        PyTuple_SET_ITEM(idrow, 1, idval);
        PyTuple_SET_ITEM(logrow, 0, key);
        PyTuple_SET_ITEM(logrow, 1, logval);
        PyList_SET_ITEM(ids, i, idrow);
        PyList_SET_ITEM(logs, i, logrow);
    }
    result = PyTuple_Pack(2, ids, logs);
done:
    Py_DECREF(fast);
    Py_XDECREF(ids);
    Py_XDECREF(logs);
    return result;
}

/* -- the type ------------------------------------------------------------- */

static int
load_enum(PyObject *seq, int32_t *out, int *n, const char *name)
{
    PyObject *fast = PySequence_Fast(seq, "enum values must be a sequence of int");
    if (fast == NULL)
        return -1;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
    if (len > MAX_ENUM_VALUES) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: at most %d values", name, MAX_ENUM_VALUES);
        return -1;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            Py_DECREF(fast);
            PyErr_Format(PyExc_ValueError, "%s: %ld is not an int32", name, v);
            return -1;
        }
        out[i] = (int32_t)v;
    }
    *n = (int)len;
    Py_DECREF(fast);
    return 0;
}

static int
Decoder_init(DecoderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_id_bytes",
                             "max_text_bytes",
                             "max_attributes",
                             "max_attribute_key_bytes",
                             "max_attribute_value_bytes",
                             "max_logprobs",
                             "roles",
                             "signals",
                             NULL};
    PyObject *roles, *signals;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$nnnnnnOO", kwlist, &self->max_id,
                                     &self->max_text, &self->max_attrs, &self->max_key,
                                     &self->max_value, &self->max_logprobs, &roles, &signals))
        return -1;
    if (self->max_id < 0 || self->max_text < 0 || self->max_attrs < 0 || self->max_key < 0 ||
        self->max_value < 0 || self->max_logprobs < 0) {
        PyErr_SetString(PyExc_ValueError, "limits must be >= 0");
        return -1;
    }
    if (load_enum(roles, self->roles, &self->n_roles, "roles") < 0 ||
        load_enum(signals, self->signals, &self->n_signals, "signals") < 0)
        return -1;
    return 0;
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O, decode_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar._fastpath.BatchDecoder",
    .tp_doc = PyDoc_STR("Splits and validates serialized EventBatch messages."),
    .tp_basicsize = sizeof(DecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_methods = Decoder_methods,
};

static PyMethodDef module_methods[] = {
    {"append_rows", append_rows, METH_VARARGS, append_rows_doc},
    {"count_events", count_events, METH_VARARGS, count_events_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "sidecar._fastpath",
    .m_doc = PyDoc_STR("The compiled ingest path (see sidecar/_compiled.py)."),
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&DecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "BatchDecoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
