-- Customer alerts: where each tenant hears about its limits, and what was delivered there
-- (the notifier, streams/channels/; managed with `tally notify channels`).

-- A tenant's channels. `target` is an e-mail address (email), a Slack-compatible incoming
-- webhook URL (slack) or the tenant's own HTTPS endpoint (webhook, signed with
-- `signing_secret`, which `tally notify channels add` generates and prints once).
-- A disabled channel keeps its history and receives nothing.
CREATE TABLE tally.notification_channels (
    channel_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text        NOT NULL,
    kind           text        NOT NULL CHECK (kind IN ('email', 'slack', 'webhook')),
    target         text        NOT NULL,
    signing_secret text,
    enabled        boolean     NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, kind, target),
    CHECK ((kind = 'webhook') = (signing_secret IS NOT NULL))
);

-- One row per notification delivered to a channel, written right after the channel
-- accepted it and checked right before sending: a notification replayed from the topic
-- (a restart before its offset was committed, a rebalance, a reset group) is not sent
-- again. `notification_key` is the notification's identity (streams.notifier
-- .idempotency_key: tenant, meter, period start, kind, threshold).
CREATE TABLE tally.notification_deliveries (
    notification_key text        NOT NULL,
    channel_id       bigint      NOT NULL
                                 REFERENCES tally.notification_channels ON DELETE CASCADE,
    attempts         int         NOT NULL,
    delivered_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notification_key, channel_id)
);

-- Deliveries given up on: out of attempts, or refused in a way retrying cannot change
-- (an unknown mailbox, a revoked webhook, no mail server configured). The notification
-- is kept whole so an operator can see what the customer missed.
CREATE TABLE tally.notification_dead_letters (
    notification_key text        NOT NULL,
    channel_id       bigint      NOT NULL
                                 REFERENCES tally.notification_channels ON DELETE CASCADE,
    tenant_id        text        NOT NULL,
    reason           text        NOT NULL,
    attempts         int         NOT NULL,
    last_error       text        NOT NULL,
    notification     jsonb       NOT NULL,
    failed_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notification_key, channel_id)
);

CREATE INDEX notification_channels_tenant ON tally.notification_channels (tenant_id)
    WHERE enabled;
