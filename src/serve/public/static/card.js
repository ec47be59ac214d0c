// The Kustomer Card: reads the context Kustomer gives, lists the customer's emails kept by
// mailhook and opens each in the signed, read-only page. Text only ever goes in through
// textContent: nothing from an email is parsed as HTML here.
(function () {
  'use strict';
  var attribute = document.body.getAttribute('data-attribute');
  var params = new URLSearchParams(window.location.search);
  var key = params.get('key') || '';
  var list = document.getElementById('mails');
  var status = document.getElementById('status');

  function resize() {
    if (window.Kustomer && typeof window.Kustomer.resize === 'function') {
      window.Kustomer.resize();
    }
  }

  function say(text) {
    status.textContent = text;
    resize();
  }

  function toggle(li, m) {
    var open = li.querySelector('iframe');
    if (open) {
      open.remove();
      resize();
      return;
    }
    var frame = document.createElement('iframe');
    frame.className = 'viewer';
    frame.src = m.view;
    frame.title = 'the email';
    frame.setAttribute('referrerpolicy', 'no-referrer');
    frame.addEventListener('load', resize);
    li.appendChild(frame);
    resize();
  }

  function render(data) {
    var mails = data.messages || [];
    list.textContent = '';
    say(mails.length === 0 ? 'No email in mailhook for this customer.'
      : mails.length + (mails.length === 1 ? ' email' : ' emails') + ' in mailhook');
    mails.forEach(function (m) {
      var li = document.createElement('li');
      li.className = m.current ? 'mail current' : 'mail';
      li.setAttribute('data-id', m.id);
      var button = document.createElement('button');
      button.type = 'button';
      var subject = document.createElement('div');
      subject.className = 'subject';
      subject.textContent = m.subject || '(no subject)';
      var meta = document.createElement('div');
      meta.className = 'muted';
      meta.textContent = m.receivedAt + ' · ' + (m.rule || 'no rule') + ' · ' + m.from;
      var fields = document.createElement('div');
      fields.className = 'fields';
      fields.textContent = (m.fields || []).map(function (f) { return f.name + ': ' + f.value; }).join(' · ');
      button.appendChild(subject);
      button.appendChild(meta);
      button.appendChild(fields);
      button.addEventListener('click', function () { toggle(li, m); });
      li.appendChild(button);
      list.appendChild(li);
    });
    resize();
  }

  function load(query) {
    var headers = key ? { Authorization: 'Bearer ' + key } : {};
    fetch('/kustomer/api/messages?' + query.toString(), { headers: headers, credentials: 'omit' })
      .then(function (r) { return r.json().then(function (j) { return { ok: r.ok, body: j }; }); })
      .then(function (r) {
        if (r.ok) { render(r.body); } else { say(r.body.error || 'mailhook refused the request.'); }
      })
      .catch(function () { say('mailhook could not be reached.'); });
  }

  function fromContext(context) {
    var q = new URLSearchParams();
    var customer = (context && context.customer) || {};
    var attrs = customer.attributes || customer;
    (attrs.emails || []).forEach(function (e) {
      var address = typeof e === 'string' ? e : e && e.email;
      if (address) { q.append('email', address); }
    });
    [context && context.conversation, context && context.kobject].forEach(function (o) {
      var custom = o && ((o.attributes && o.attributes.custom) || o.custom);
      var v = custom && custom[attribute];
      if (typeof v === 'string' && v) { q.append(v.indexOf('sig=') >= 0 ? 'link' : 'current', v); }
    });
    return q;
  }

  if (window.Kustomer && typeof window.Kustomer.initialize === 'function') {
    window.Kustomer.initialize(function (context) { load(fromContext(context)); });
  } else if (params.get('link') || (params.get('m') && params.get('sig'))) {
    var q = new URLSearchParams();
    q.append('link', params.get('link') ||
      ('m/' + params.get('m') + '?exp=' + params.get('exp') + '&sig=' + encodeURIComponent(params.get('sig'))));
    load(q);
  } else {
    say('Open this card from Kustomer, or with a signed mailhook link.');
  }
})();
