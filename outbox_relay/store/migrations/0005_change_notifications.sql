-- Workers hear about configuration changes at once instead of at their next slice: a relay that is
-- disabled stops within a second, a changed database or target is reconnected. One notification
-- per changed row, 'table:id', delivered at commit; rows whose updated_at did not move (maintenance
-- bookkeeping) stay quiet.
CREATE OR REPLACE FUNCTION notify_config_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay_config', TG_TABLE_NAME || ':' || coalesce(NEW.id, OLD.id)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER relays_config_changed AFTER UPDATE ON relays FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at OR OLD.enabled IS DISTINCT FROM NEW.enabled)
    EXECUTE FUNCTION notify_config_change();
CREATE TRIGGER relays_config_deleted AFTER DELETE ON relays FOR EACH ROW
    EXECUTE FUNCTION notify_config_change();
CREATE TRIGGER databases_config_changed AFTER UPDATE ON databases FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at)
    EXECUTE FUNCTION notify_config_change();
CREATE TRIGGER databases_config_deleted AFTER DELETE ON databases FOR EACH ROW
    EXECUTE FUNCTION notify_config_change();
CREATE TRIGGER targets_config_changed AFTER UPDATE ON targets FOR EACH ROW
    WHEN (OLD.updated_at IS DISTINCT FROM NEW.updated_at)
    EXECUTE FUNCTION notify_config_change();
CREATE TRIGGER targets_config_deleted AFTER DELETE ON targets FOR EACH ROW
    EXECUTE FUNCTION notify_config_change();
