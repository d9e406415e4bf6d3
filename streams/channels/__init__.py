"""Customer alerts: each tenant's notifications delivered to its own channels.

A tenant has channels in `tally.notification_channels` (`tally notify channels add`):
e-mail (`mail.py`: SMTP, a plain-text and an HTML body), Slack-compatible incoming webhooks
(`slack.py`: `{"text": ...}`) and its own signed webhook (`webhook.py`). The notifier
(streams/notifier.py) hands every notification it reads to `ChannelDelivery`
(`delivery.py`), which sends it to each enabled channel of its tenant, once:

1. look up the tenant's enabled channels (every time: a channel added or disabled counts
   from the next notification on);
2. per channel, side by side, in one transaction per attempt: take a transaction-scoped
   advisory lock on (notification, channel), so two notifiers never send the same
   delivery at once (during a rebalance both may hold the record);
3. skip it if `tally.notification_deliveries` or `tally.notification_dead_letters` has a
   row for (notification, channel): it was handled before;
4. send it once; on success insert the delivery row and commit;
5. on a failure roll back, wait with exponential backoff (a receiver's Retry-After is
   honoured up to the cap) and go back to 2, until `max_attempts`; a refusal that retrying
   cannot change (an unknown mailbox, a revoked webhook, no mail server configured) or the
   last attempt writes a dead-letter row instead (`tally_notifier_dead_letters_total`).
Only when every channel is delivered or dead-lettered does the notifier commit the
record's offset.

"Once" is at-least-once with deduplication: a notification is sent again only if the
process dies, or Postgres fails, after a channel accepted it and before its delivery row
committed (the time of one INSERT and COMMIT, a few milliseconds), or if Postgres loses
the rows. A notification replayed from the topic for any other reason is not sent again.
Receivers that can dedup get help: e-mails carry a Message-ID made of the notification
and the channel, and webhooks the notification's Idempotency-Key.
"""
